"""`uniner evaluate`: the official UniNER scores per dataset, with our span and lenient scores beside them.

The official protocol (universal-ner `src/eval`, docs/design.md section 3): one query per (text, type); the output is
cut to what follows its last `ASSISTANT:` and stripped; a JSON list is read only from the start of it, on one line,
up to the first `]`; every string is normalized (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed) and deduplicated; any failure reads as []. Micro precision/recall/F1 per dataset, with the
official script's 1e-10 terms; the headline is the plain mean of the per-dataset F1s.

Ours, named as ours: `lenient` reads the list anywhere in the answer (uniner.formats.parse_answer_lenient);
`span` is strict character-span F1 where the data has offsets (BIO files), each predicted string standing for
every whole-token occurrence of it in the sentence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable

from uniner import bio, storage
from uniner.config import EvaluateConfig, to_dict
from uniner.conversations import check_conversation, dataset_name_of, eval_queries
from uniner.errors import UserError
from uniner.formats import answer_text, official_list, parse_answer_lenient
from uniner.models import short_name

log = logging.getLogger("uniner.evaluate")

REFERENCE_NOTE = (
    "Paper rows: zero-shot F1 on the full test sets (Zhou et al., 2023, Table 1). Ours may be on samples "
    "or other splits: a guide, not a like-for-like comparison."
)
# Zero-shot strict F1 (%) from the UniversalNER paper (Zhou et al., 2023, Table 1), by domain.
REFERENCE_F1 = {
    "ChatGPT (paper)": {
        "movie": 5.3,
        "restaurant": 32.8,
        "ai": 52.4,
        "literature": 39.8,
        "music": 66.6,
        "politics": 68.5,
        "science": 67.0,
    },
    "UniNER-7B (paper)": {
        "movie": 42.4,
        "restaurant": 31.7,
        "ai": 53.5,
        "literature": 59.4,
        "music": 65.0,
        "politics": 60.8,
        "science": 61.1,
    },
}
_QUESTION = re.compile(r"^What describes (.*) in the text\?$", re.DOTALL)
_TEXT = re.compile(r"^(?:Dataset: [^\n]*\n)?Text: (.*)$", re.DOTALL)


# ---------------------------------------------------------------- the official protocol


def normalize(text: str) -> str:
    """Lower case, punctuation removed, articles a/an/the removed, whitespace collapsed (the SQuAD rule)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def official_items(text: str) -> list:
    """The official parser: the normalized, deduplicated items of the JSON list at the start of `text`.

    Any failure, including an item that is not a string (or a list of strings), reads as [], as in the official
    script, which wraps the whole parse in one `except Exception`.
    """
    try:
        found: list = []
        for item in official_list(text):
            item = tuple(normalize(e) for e in item) if isinstance(item, (list, tuple)) else normalize(item)
            if item not in found:
                found.append(item)
        return found
    except Exception:  # noqa: BLE001 - the protocol counts every failure as an empty answer
        return []


def prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    """Micro precision, recall and F1 with the official script's 1e-10 terms."""
    precision = correct / (predicted + 1e-10)
    recall = correct / (gold + 1e-10)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall + 1e-10)}


@dataclass
class Counts:
    correct: int = 0
    predicted: int = 0
    gold: int = 0

    def add(self, predicted: list, gold: list) -> None:
        self.correct += sum(1 for item in predicted if item in gold)
        self.predicted += len(predicted)
        self.gold += len(gold)

    def scores(self) -> dict[str, Any]:
        return {
            **prf(self.correct, self.predicted, self.gold),
            "tp": self.correct,
            "fp": self.predicted - self.correct,
            "fn": self.gold - self.correct,
        }


# ---------------------------------------------------------------- datasets


@dataclass
class Query:
    dataset: str
    id: str
    prompt_turns: list[tuple[str, str]]  # the conversation without its gold answer
    entity_type: str
    text: str
    gold: str  # the raw gold answer, a JSON list
    gold_spans: set[tuple[int, int]] | None = None  # character spans, where the data has them


def _sampled(keys: list[str], n: int, seed: int) -> set[str]:
    """A fixed sample of n keys: the smallest seeded hashes, so it never depends on file order."""
    rank = sorted(keys, key=lambda k: hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest())
    return set(rank[:n]) if n else set(keys)


def _from_conversations(location: storage.Location, name: str, config: EvaluateConfig) -> list[Query]:
    records = storage.read_json_records(location)
    keep = _sampled(
        [str(r.get("id")) for _, r in records if isinstance(r, dict)], config.sample_per_dataset, config.seed
    )
    queries = []
    for where, record in records:
        checked = check_conversation(record, where, counts := defaultdict(int))
        if checked is None or counts:
            raise UserError(f"{where}: an evaluation record must end with a question and its gold answer")
        if str(record["id"]) not in keep:
            continue
        turns = [(t["from"], t["value"]) for t in record["conversations"]]
        question = _QUESTION.match(turns[-2][1])
        if not question:
            raise UserError(f"{where}: the last question is not `What describes TYPE in the text?`")
        queries.append(
            Query(
                dataset=name,
                id=str(record["id"]),
                prompt_turns=turns[:-1],
                entity_type=question.group(1),
                text=_TEXT.match(turns[0][1]).group(1),
                gold=turns[-1][1],
            )
        )
    return queries


def _from_bio(location: storage.Location, name: str, config: EvaluateConfig, label_map) -> list[Query]:
    data = bio.read_bio(
        str(location), column_order=config.bio_column_order, label_map=label_map, s3_endpoint_url=config.s3_endpoint_url
    )
    keep = _sampled([str(i) for i in range(len(data.sentences))], config.sample_per_dataset, config.seed)
    queries = []
    for record in eval_queries(data, name):
        _, sentence_index, type_index = record["id"].rsplit("-", 2)
        if sentence_index not in keep:
            continue
        sentence, entity_type = data.sentences[int(sentence_index)], data.types[int(type_index)]
        turns = [(t["from"], t["value"]) for t in record["conversations"]]
        spans = {(e.start, e.end) for e in sentence.entities if e.type == entity_type}
        queries.append(
            Query(
                dataset=name,
                id=record["id"],
                prompt_turns=turns[:-1],
                entity_type=entity_type,
                text=sentence.text,
                gold=turns[-1][1],
                gold_spans=spans,
            )
        )
    return queries


def load_queries(config: EvaluateConfig) -> dict[str, list[Query]]:
    """Queries per dataset, in file order. A dataset is named by its file: the stem of a JSON file, folder and stem
    of a BIO file (`crossner/ai/dev.txt` -> `ai-dev`)."""
    label_map = bio.read_label_map(config.label_map, s3_endpoint_url=config.s3_endpoint_url)
    datasets: dict[str, list[Query]] = {}
    for uri in config.data:
        location = config.locate(uri)
        if location.path.endswith((".json", ".jsonl")):
            name = PurePosixPath(location.path).stem
            queries = _from_conversations(location, name, config)
        else:
            name = dataset_name_of(uri)
            queries = _from_bio(location, name, config, label_map)
        if name in datasets:
            raise UserError(f"two evaluation files are both named {name!r}; rename one (datasets are named by file)")
        datasets[name] = queries
    return datasets


# ---------------------------------------------------------------- answers


def read_predictions(
    config: EvaluateConfig, datasets: dict[str, list[Query]]
) -> tuple[dict[tuple[str, str], str], int]:
    """`{"id", "output"}` per line (plus `"dataset"` where ids repeat across datasets) -> output by (dataset, id)."""
    location = config.locate(config.predictions)
    owners = defaultdict(list)
    for name, queries in datasets.items():
        for query in queries:
            owners[query.id].append(name)
    outputs, unknown, first_line = {}, 0, {}
    for where, row in storage.read_json_records(location, lines=True):
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise UserError(f'{where}: expected a JSON object {{"id": ..., "output": "..."}}, found {str(row)[:60]!r}')
        query_id, output = str(row["id"]), row["output"]
        names = [row["dataset"]] if "dataset" in row else owners.get(query_id, [])
        if len(names) > 1:
            raise UserError(
                f"{where}: id {query_id!r} is in several datasets "
                f'({", ".join(names)}); add a "dataset" field to each prediction'
            )
        if not names or query_id not in {q.id for q in datasets.get(names[0], [])}:
            unknown += 1
            continue
        if (names[0], query_id) in first_line:
            raise UserError(
                f"{where}: a second prediction for id {query_id!r} of {names[0]} (the first is at "
                f"{first_line[(names[0], query_id)]}): keep one prediction per query"
            )
        first_line[(names[0], query_id)] = where
        outputs[(names[0], query_id)] = output if isinstance(output, str) else json.dumps(output)
    return outputs, unknown


def covered_queries(datasets: dict[str, list[Query]], outputs: dict[tuple[str, str], str]) -> tuple[int, int]:
    """(queries with a prediction, all queries)."""
    covered = sum((name, q.id) in outputs for name, queries in datasets.items() for q in queries)
    return covered, sum(len(queries) for queries in datasets.values())


def check_coverage(
    config: EvaluateConfig, datasets: dict[str, list[Query]], outputs: dict[tuple[str, str], str]
) -> None:
    """Predictions that leave queries out would score them as empty answers: refused unless asked for."""
    covered, total = covered_queries(datasets, outputs)
    if covered < total and not config.allow_missing:
        raise UserError(
            f"--predictions {config.predictions} answer {covered} of {total} queries: predict them all "
            "(with the same --sample-per-dataset and --seed), or pass --allow-missing to count the rest as "
            "empty answers"
        )


def generate(config: EvaluateConfig, datasets: dict[str, list[Query]], model: str) -> dict[tuple[str, str], str]:
    """Run a model over every query through the extraction engine; the prompt is the conversation up to the
    final `ASSISTANT:`, with the model's own EOS string as the template's separator."""
    from uniner.engine import answer_prompts, template_for
    from uniner.models import load_tokenizer, resolve_model

    model_dir = resolve_model(model, s3_endpoint_url=config.s3_endpoint_url)
    template = template_for(load_tokenizer(str(model_dir)))
    queries = [q for qs in datasets.values() for q in qs]
    prompts = [template.render(q.prompt_turns) for q in queries]
    outputs = answer_prompts(
        prompts,
        model=str(model_dir),
        backend=config.backend,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        replicas=config.replicas,
        gpus_per_replica=config.gpus_per_replica,
    )
    return {(q.dataset, q.id): output for q, output in zip(queries, outputs)}


# ---------------------------------------------------------------- scoring


def _token_occurrences(text: str, entity: str) -> set[tuple[int, int]]:
    """Spans of `entity` in a space-joined sentence that start and end at token boundaries."""
    spans, start = set(), text.find(entity)
    while entity and start >= 0:
        end = start + len(entity)
        if (start == 0 or text[start - 1] == " ") and (end == len(text) or text[end] == " "):
            spans.add((start, end))
        start = text.find(entity, start + 1)
    return spans


def score_dataset(queries: list[Query], outputs: dict[tuple[str, str], str]) -> dict[str, Any]:
    official, lenient, span = Counts(), Counts(), Counts()
    per_type: dict[str, Counts] = defaultdict(Counts)
    has_spans = bool(queries) and all(q.gold_spans is not None for q in queries)
    missing = 0
    for query in queries:
        output = outputs.get((query.dataset, query.id))
        if output is None:
            missing += 1
            output = ""
        gold = official_items(query.gold)
        predicted = official_items(answer_text(output))
        official.add(predicted, gold)
        per_type[query.entity_type].add(predicted, gold)
        strings = parse_answer_lenient(output)
        lenient.add(list(dict.fromkeys(normalize(s) for s in strings)), gold)
        if has_spans:
            spans = set().union(*(_token_occurrences(query.text, s) for s in strings))
            span.add(list(spans), list(query.gold_spans))
    return {
        **official.scores(),
        "n_queries": len(queries),
        "support": official.gold,
        "missing_predictions": missing,
        "per_type": {t: {**c.scores(), "support": c.gold} for t, c in sorted(per_type.items())},
        "ours_lenient_parser": lenient.scores(),
        "ours_span": span.scores() if has_spans else None,
    }


def reference_domain(dataset: str) -> str | None:
    """The paper's domain a dataset name refers to (`CrossNER_AI`, `ai-dev` -> ai; `mit-movie` -> movie)."""
    words = set(re.split(r"[^a-z0-9]+", dataset.lower()))
    return next((d for d in REFERENCE_F1["UniNER-7B (paper)"] if d in words), None)


# ---------------------------------------------------------------- reports


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation: {report['subject']}",
        "",
        "Official UniNER protocol (strict F1 of normalized strings); `lenient` and `span` are ours.",
        "",
        "| dataset | queries | precision | recall | F1 | lenient F1 (ours) | span F1 (ours) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, scores in report["datasets"].items():
        span = scores["ours_span"]
        lines.append(
            f"| {name} | {scores['n_queries']} | {scores['precision']:.1%} | {scores['recall']:.1%} | "
            f"{scores['f1']:.1%} | {scores['ours_lenient_parser']['f1']:.1%} | "
            + (f"{span['f1']:.1%} |" if span else "- |")
        )
    lines += [f"| **average** | | | | **{report['average_f1']:.1%}** | | |", ""]
    if report.get("baseline"):
        baseline = report["baseline"]
        lines += [
            f"Baseline {baseline['subject']} on the same queries: "
            + ", ".join(f"{name} F1 {f1:.1%}" for name, f1 in baseline["f1"].items())
            + f"; average **{baseline['average_f1']:.1%}**.",
            "",
        ]
    references = _reference_rows(report)
    if references:
        lines += [
            "Reference rows (zero-shot, the UniversalNER paper, Table 1; other models and test sets):",
            "",
            "| model | " + " | ".join(references["datasets"]) + " |",
            "| --- |" + " ---: |" * len(references["datasets"]),
        ]
        for model, values in references["rows"].items():
            lines.append(f"| {model} | " + " | ".join(f"{v:.1f}%" for v in values) + " |")
        lines.append("")
    missing = sum(s["missing_predictions"] for s in report["datasets"].values())
    if missing or report.get("unknown_predictions"):
        lines.append(
            f"{missing} queries had no prediction (scored as []); "
            f"{report.get('unknown_predictions', 0)} predictions matched no query."
        )
    return "\n".join(lines) + "\n"


def _reference_rows(report: dict[str, Any]) -> dict[str, Any]:
    names = [n for n in report["datasets"] if reference_domain(n)]
    if not names:
        return {}
    return {"datasets": names, "rows": {m: [REFERENCE_F1[m][reference_domain(n)] for n in names] for m in REFERENCE_F1}}


def f1_bars(columns: list[str], series: dict[str, list[float]], path: str, *, note: str = "") -> None:
    """A grouped bar chart of F1 (%): one group per column, one bar per series (NaN leaves a gap), and a note
    under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(columns)), 4))
    for index, (label, values) in enumerate(series.items()):
        axes.bar([i + index * width for i in range(len(columns))], values, width=width, label=label)
    axes.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(columns))], columns, rotation=30, ha="right")
    axes.set_ylabel("F1 (%), official protocol")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")
    if note:
        figure.text(0.01, 0.01, note, fontsize="x-small", color="#555", wrap=True)
    figure.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_chart(report: dict[str, Any], path: str) -> None:
    """Bars of F1 per dataset (and the average), with the paper's rows beside ours where the domain matches."""
    names = list(report["datasets"])
    series = {
        short_name(report["subject"]): [100 * report["datasets"][n]["f1"] for n in names] + [100 * report["average_f1"]]
    }
    if report.get("baseline"):
        baseline = report["baseline"]
        series[f"{short_name(baseline['subject'])} (baseline)"] = [100 * baseline["f1"][n] for n in names] + [
            100 * baseline["average_f1"]
        ]
    matched = any(reference_domain(n) for n in names)
    if matched:
        for model, values in REFERENCE_F1.items():
            series[model] = [values.get(reference_domain(n) or "", float("nan")) for n in names] + [float("nan")]
    f1_bars(names + ["average"], series, path, note=REFERENCE_NOTE if matched else "")


# ---------------------------------------------------------------- the stage


def plan(config: EvaluateConfig) -> list[str]:
    datasets = load_queries(config)
    lines = [f"{name}: {len(queries)} queries" for name, queries in datasets.items()]
    source = f"run {config.model} ({config.backend} backend)" if config.model else f"score {config.predictions}"
    return lines + [source, f"write report.json, report.md and report.png to {config.output}"]


def mean_f1(values: Iterable[float]) -> float:
    """The plain mean of per-dataset F1 (the official average); 0 with no dataset."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def run(config: EvaluateConfig) -> dict[str, Any]:
    output = config.locate(config.output)
    datasets = load_queries(config)
    unknown = 0
    if not config.model:
        outputs, unknown = read_predictions(config, datasets)
        check_coverage(config, datasets, outputs)
    storage.prepare_output(output, overwrite=config.overwrite)
    started = time.time()
    if config.model:
        outputs = generate(config, datasets, config.model)
        write_predictions(output.join("predictions.jsonl"), outputs)
    scores = {name: score_dataset(queries, outputs) for name, queries in datasets.items()}
    baseline = {}
    if config.baseline:
        log.info("evaluate: running the baseline %s on the same queries", config.baseline)
        baseline_outputs = generate(config, datasets, config.baseline)
        write_predictions(output.join("baseline_predictions.jsonl"), baseline_outputs)
        baseline_f1 = {name: score_dataset(queries, baseline_outputs)["f1"] for name, queries in datasets.items()}
        baseline = {
            "subject": config.baseline,
            "f1": baseline_f1,
            "average_f1": mean_f1(baseline_f1.values()),
        }
    covered, queries = covered_queries(datasets, outputs)
    report = {
        "subject": config.model or PurePosixPath(config.predictions).name,
        "protocol": "UniNER official: answer after the last ASSISTANT:, JSON list at its start, SQuAD normalization, "
        "deduplicated, micro P/R/F1 per dataset, plain mean of F1 over datasets",
        "datasets": scores,
        "average_f1": mean_f1(s["f1"] for s in scores.values()),
        "unknown_predictions": unknown,
        "coverage": covered / queries if queries else 1.0,
        "seconds": round(time.time() - started, 1),
        "baseline": baseline,
    }
    storage.write_json(output.join("report.json"), report)
    storage.write_text(output.join("report.md"), report_markdown(report))
    if output.is_s3:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            report_chart(report, f"{folder}/report.png")
            storage.upload_tree(folder, output)
    else:
        report_chart(report, output.join("report.png").path)
    summary = {
        "output": str(output),
        "average_f1": report["average_f1"],
        "datasets": {
            n: {k: s[k] for k in ("precision", "recall", "f1", "n_queries", "missing_predictions")}
            for n, s in scores.items()
        },
        "unknown_predictions": unknown,
        "queries": queries,
        "coverage": report["coverage"],
        "subject": report["subject"],
        "baseline": baseline,
        "config": to_dict(config),
    }
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    return summary


def write_predictions(location: storage.Location, outputs: dict[tuple[str, str], str]) -> None:
    lines = [json.dumps({"dataset": d, "id": i, "output": o}, ensure_ascii=False) for (d, i), o in outputs.items()]
    storage.write_text(location, "\n".join(lines) + "\n")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    baseline = summary.get("baseline") or {}
    lines = [
        f"{name}: F1 {s['f1']:.1%} (P {s['precision']:.1%}, R {s['recall']:.1%}) over {s['n_queries']} queries"
        + (f"; {s['missing_predictions']} without a prediction" if s["missing_predictions"] else "")
        + (f"; baseline F1 {baseline['f1'][name]:.1%}" if baseline else "")
        for name, s in summary["datasets"].items()
    ]
    lines.append(f"average F1 {summary['average_f1']:.1%} (official protocol)")
    if baseline:
        lines.append(
            f"average F1 {baseline['average_f1']:.1%} for the baseline {short_name(baseline['subject'])} -> "
            f"{summary['average_f1']:.1%} for {short_name(summary['subject'])}"
        )
    if summary.get("coverage", 1.0) < 1.0:
        lines.append(
            f"predictions cover {summary['coverage']:.1%} of {summary['queries']} queries; the rest count as "
            "empty answers (--allow-missing)"
        )
    if summary["unknown_predictions"]:
        lines.append(f"{summary['unknown_predictions']} predictions matched no query")
    return lines + [f"report: {summary['output']}/report.md, report.json, report.png"]

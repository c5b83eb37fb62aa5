"""`uniner build-data`: teacher annotations, UniNER conversation files or BIO files -> UniNER conversations.

Output: OUTPUT/conversations.json in the official Pile-NER `train.json` shape (a JSON list of
`{id, conversations: [{from, value}], dataset?}`), one record per line, so the public UniNER data and ours are
interchangeable; with `--eval-queries`, OUTPUT/<dataset>.json per BIO file in the UniNER evaluation shape (one
conversation per (sentence, type)). OUTPUT/_summary.json holds the counts and the type statistics.

A single streaming process: building conversations is string work, seconds for the paper's 50K passages; the
global type frequencies that negative sampling needs are one pass over the annotations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow.dataset as pads

from uniner import bio, storage
from uniner.chunking import SENTENCE_END
from uniner.config import BuildDataConfig, to_dict
from uniner.conversations import (
    check_conversation,
    conversation,
    dataset_name_of,
    dump_records,
    eval_queries,
    question_type,
    questions_and_answers,
    text_of,
    type_statistics,
)
from uniner.errors import UserError
from uniner.formats import question

log = logging.getLogger("uniner.build_data")

CONVERSATIONS_FILE = "conversations.json"
BIO_SUFFIXES = (".txt", ".bio", ".conll", ".tsv")
CONVERSATION_SUFFIXES = (".json", ".jsonl")


# ---------------------------------------------------------------- negative types


def _stable_int(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class NegativeSampler:
    """Draws types a passage lacks with probability proportional to each type's frequency over the whole dataset,
    without replacement. Draws depend only on (seed, passage id), so any order of passages gives the same data."""

    def __init__(self, type_frequency: Counter, *, seed: int):
        self.types = sorted(type_frequency)
        self.cumulative = np.cumsum([type_frequency[t] for t in self.types], dtype=np.float64)
        self.seed = seed

    def sample(self, key: str, *, exclude: set[str], k: int) -> list[str]:
        k = min(k, len(self.types) - len(exclude.intersection(self.types)))
        if k <= 0:
            return []
        rng = np.random.default_rng([self.seed, _stable_int(key)])
        chosen: list[str] = []
        for _ in range(64):  # rounds of draws; only types holding nearly all the mass can exhaust them
            draws = np.searchsorted(self.cumulative, rng.random(4 * k) * self.cumulative[-1], side="right")
            for index in draws:
                candidate = self.types[min(index, len(self.types) - 1)]
                if candidate not in exclude and candidate not in chosen:
                    chosen.append(candidate)
                    if len(chosen) == k:
                        return chosen
        return chosen


# ---------------------------------------------------------------- type statistics


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def type_variant_merges(mentions: Counter) -> dict[str, str]:
    """Variant -> canonical type for types that differ only in case or a plural ending of the last word; the
    canonical form is the most frequent variant."""
    groups: dict[str, list[str]] = {}
    for entity_type in mentions:
        words = entity_type.lower().split()
        key = " ".join(words[:-1] + [_singular(words[-1])]) if words else ""
        groups.setdefault(key, []).append(entity_type)
    merges = {}
    for variants in groups.values():
        canonical = max(variants, key=lambda t: (mentions[t], t == t.lower(), t))
        merges.update({v: canonical for v in variants if v != canonical})
    return merges


# ---------------------------------------------------------------- annotations


def _read_annotations(uri: str, config: BuildDataConfig) -> Iterable[dict[str, Any]]:
    location = config.locate(uri)
    files = [f for f in storage.list_files(location) if f.path.endswith(".parquet")]
    if not files:
        raise UserError(f"no .parquet annotation files in {uri}: give the output of `uniner annotate`")
    dataset = pads.dataset([f.path for f in files], filesystem=location.fs, format="parquet")
    missing = {"passage_id", "text", "entities"} - set(dataset.schema.names)
    if missing:
        raise UserError(f"{uri} is not an annotations table: columns {', '.join(sorted(missing))} are missing")
    columns = [c for c in ("passage_id", "text", "entities", "status") if c in dataset.schema.names]
    with storage.storage_errors("read annotations from", location):
        for batch in dataset.to_batches(columns=columns):
            yield from batch.to_pylist()


def _clean_entities(row: dict[str, Any], config: BuildDataConfig, counts: Counter) -> list[tuple[int, str, str]]:
    """(position, text, type) of the usable entities, ordered by first appearance in the passage."""
    kept = []
    for order, entity in enumerate(row["entities"] or []):
        text, entity_type = (entity.get("text") or "").strip(), (entity.get("type") or "").strip()
        if not text or not entity_type:
            counts["entities dropped: empty text or type"] += 1
            continue
        position = row["text"].find(text)
        if position < 0 and config.drop_entities_not_in_text:
            counts["entities dropped: not in the passage"] += 1
            continue
        # Entities the teacher gave that are not in the passage (when kept) go last, in the teacher's order.
        kept.append((position if position >= 0 else len(row["text"]) + order, text, entity_type))
    return sorted(kept)


def from_annotations(uri: str, config: BuildDataConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    counts: Counter = Counter()
    passages = []
    for row in _read_annotations(uri, config):
        status = row.get("status", "ok")
        if status != "ok":
            counts[f"passages skipped: status {status}"] += 1
            continue
        entities = _clean_entities(row, config, counts)
        if not entities:
            counts["passages skipped: no entities"] += 1
            continue
        passages.append((row["passage_id"], row["text"], entities))
    mentions = Counter(t for _, _, entities in passages for _, _, t in entities)
    merges = type_variant_merges(mentions) if config.merge_type_variants else {}
    records, mentions, frequency = [], Counter(), Counter()
    grouped = []
    for passage_id, text, entities in passages:
        by_type: dict[str, list[str]] = {}
        for _, entity, entity_type in entities:
            by_type.setdefault(merges.get(entity_type, entity_type), []).append(entity)
        by_type = {t: list(dict.fromkeys(e)) for t, e in by_type.items()}
        mentions.update({t: len(e) for t, e in by_type.items()})
        frequency.update(by_type.keys())
        grouped.append((passage_id, text, by_type))
    sampler = NegativeSampler(frequency, seed=config.seed)
    negative_questions = 0
    for passage_id, text, by_type in grouped:
        negatives = sampler.sample(passage_id, exclude=set(by_type), k=config.negatives_per_passage)
        qa = list(by_type.items()) + [(t, []) for t in negatives]
        records.append(conversation(passage_id, text, qa))
        negative_questions += len(negatives)
    statistics = {"passages": len(records), **type_statistics(mentions), "negative_questions": negative_questions}
    if merges:
        statistics["type_merges"] = dict(sorted(merges.items()))
    return records, {"counts": dict(counts), "statistics": statistics}


# ---------------------------------------------------------------- conversation files


def from_conversations(uri: str, config: BuildDataConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    location = config.locate(uri)
    counts: Counter = Counter()
    records, mentions = [], Counter()
    entities_by_type: dict[str, set[str]] = {}  # lower-cased, for --absent-types-per-passage
    for where, raw in storage.read_json_records(location):
        record = check_conversation(raw, f"{where} (id {raw.get('id') if isinstance(raw, dict) else '?'})", counts)
        if record is None:
            continue
        for entity_type, answer in questions_and_answers(record):
            mentions[entity_type] += len(answer)
            if answer:
                entities_by_type.setdefault(entity_type, set()).update(e.lower() for e in answer)
        records.append(record)
    mentions = +mentions  # types only ever answered [] have no mention
    statistics = {"passages": len(records), **type_statistics(mentions)}
    if config.absent_types_per_passage:
        records, statistics["absent_type_questions"] = add_absent_types(records, entities_by_type, config)
    return records, {"counts": dict(counts), "statistics": statistics}


def add_absent_types(
    records: list[dict[str, Any]], entities_by_type: dict[str, set[str]], config: BuildDataConfig
) -> tuple[list[dict[str, Any]], int]:
    """Each record with `absent_types_per_passage` more questions answered []: types other records' answers name
    (the keys of `entities_by_type`, whose values are their entities lower-cased), drawn uniformly among those the
    record does not ask. Sampled labels ask only some of a passage's types, so a type stays out when its text holds
    any entity the file gives that type elsewhere, and uniform draws favour the specific types of the long tail over
    `person` or `date`, which an unrelated passage often holds unasked."""
    sampler = NegativeSampler(Counter(dict.fromkeys(entities_by_type, 1)), seed=config.seed)
    extended, added = [], 0
    for record in records:
        turns = record["conversations"]
        text = text_of(record).lower()
        asked = {entity_type for entity_type, _ in questions_and_answers(record)}
        present = {t for t, entities in entities_by_type.items() if any(e in text for e in entities)}
        absent = sampler.sample(record["id"], exclude=asked | present, k=config.absent_types_per_passage)
        questions = [
            turn
            for t in absent
            for turn in ({"from": "human", "value": question(t)}, {"from": "gpt", "value": bio.answer([])})
        ]
        extended.append({**record, "conversations": turns + questions})
        added += len(absent)
    return extended, added


# ---------------------------------------------------------------- BIO files


def bio_files(uri: str, config: BuildDataConfig) -> list[storage.Location]:
    location = config.locate(uri)
    files = [f for f in storage.list_files(location) if f.path.endswith(BIO_SUFFIXES)]
    if not files:
        raise UserError(f"no BIO files ({', '.join(BIO_SUFFIXES)}) at {uri}")
    return files


def from_bio(uri: str, config: BuildDataConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Conversations per BIO file: every type of the file's label set asked of every sentence (absent ones answer
    []), with `Dataset: NAME` before the text when --dataset-name is set."""
    label_map = bio.read_label_map(config.label_map, s3_endpoint_url=config.s3_endpoint_url)
    outputs: dict[str, list[dict[str, Any]]] = {}
    counts: Counter = Counter()
    mentions: Counter = Counter()
    for location in bio_files(uri, config):
        data = bio.read_bio(
            str(location),
            column_order=config.bio_column_order,
            label_map=label_map,
            s3_endpoint_url=config.s3_endpoint_url,
        )
        name = dataset_name_of(str(location))
        counts.update({f"repairs: {name}: {what}": n for what, n in data.repairs.items()})
        mentions.update(e.type for s in data.sentences for e in s.entities)
        if config.eval_queries:
            outputs[f"{name}.json"] = eval_queries(data, name)
            continue
        records = outputs.setdefault(CONVERSATIONS_FILE, [])
        for index, sentence in enumerate(data.sentences):
            qa = [(t, bio.entities_of_type(sentence, t)) for t in data.types]
            records.append(conversation(f"{name}-{index}", sentence.text, qa, dataset=config.dataset_name))
        counts[f"sentences: {name}"] = len(data.sentences)
    records_written = sum(len(r) for r in outputs.values())
    return outputs, {"counts": dict(counts), "statistics": {"records": records_written, **type_statistics(mentions)}}


# ---------------------------------------------------------------- forms people write

TYPE_FORMS = (
    lambda t: t[:1].upper() + t[1:],  # Capitalised
    lambda t: " ".join(w[:1].upper() + w[1:] for w in t.split(" ")),  # Title Case
    str.upper,
    lambda t: t.replace(" ", "_"),
)


def vary_forms(record: dict[str, Any], *, type_forms: bool, lowercase_share: float, seed: int) -> dict[str, Any]:
    """The record with its types asked in the forms people write and, for a seeded share of records, its text and
    answers lower-cased: users ask for `Restaurant Name` or `PERSON`, and query logs are lower case, while teacher
    labels are mostly lower-case types over edited text. The draws depend only on (seed, record id)."""
    rng = np.random.default_rng([seed, _stable_int(f"forms:{record['id']}")])
    lower = rng.random() < lowercase_share
    turns = [dict(turn) for turn in record["conversations"]]
    if lower:
        prefix, _, text = turns[0]["value"].partition("Text: ")
        turns[0]["value"] = f"{prefix}Text: {text.lower()}"
    for index in range(2, len(turns), 2):
        if type_forms and rng.random() < 0.5:
            form = TYPE_FORMS[rng.integers(len(TYPE_FORMS))]
            turns[index]["value"] = question(form(question_type(turns[index]["value"])))
        if lower:
            turns[index + 1]["value"] = bio.answer([e.lower() for e in json.loads(turns[index + 1]["value"])])
    return {**record, "conversations": turns}


# ---------------------------------------------------------------- windows


def _pieces(text: str, words: int) -> Iterable[tuple[int, int, int]]:
    """(start, end, word count) of the text's sentences and lines; a sentence of more than `words` words is cut
    between words. Sentences end where extract's chunking ends them, so training windows match inference chunks."""
    ends = sorted({m.end() for m in SENTENCE_END.finditer(text)} | {m.start() for m in re.finditer(r"\n", text)})
    start = 0
    for end in ends + [len(text)]:
        tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[start:end])]
        for first in range(0, len(tokens), words):
            chunk = tokens[first : first + words]
            yield start + chunk[0][0], start + chunk[-1][1], len(chunk)
        start = end


def text_windows(text: str, words: int) -> list[str]:
    """The text cut at sentence ends into windows of at most `words` words, each as the text writes it."""
    windows: list[list[int]] = []  # [start, end, word count]
    for start, end, count in _pieces(text, words):
        if windows and windows[-1][2] + count <= words:
            windows[-1][1:] = [end, windows[-1][2] + count]
        else:
            windows.append([start, end, count])
    return [text[start:end] for start, end, _ in windows]


def windowed(record: dict[str, Any], words: int) -> list[dict[str, Any]]:
    """The record as one record per window of its text, every question kept and each answer limited to the
    entities the window holds: evaluation and extraction ask about a sentence or a short chunk, so a passage-long
    text in training teaches neither that length nor an empty answer where the type is elsewhere in the passage.
    A record whose text fits one window is returned as it is."""
    windows = text_windows(text_of(record), words)
    if len(windows) <= 1:
        return [record]
    qa = questions_and_answers(record)
    return [
        conversation(
            f"{record['id']}-w{index}",
            window,
            [(entity_type, [e for e in entities if e in window]) for entity_type, entities in qa],
            dataset=record.get("dataset", ""),
        )
        for index, window in enumerate(windows)
    ]


# ---------------------------------------------------------------- the stage


def heldout_texts(config: BuildDataConfig) -> set[str]:
    """The texts of --holdout's conversation files."""
    texts = set()
    for uri in config.holdout:
        location = config.locate(uri)
        for where, record in storage.read_json_records(location):
            checked = check_conversation(record, where, Counter())
            if checked is not None:
                texts.add(text_of(checked))
    return texts


def input_kind(uri: str, config: BuildDataConfig) -> str:
    if config.input_kind != "auto":
        return config.input_kind
    path = uri.rstrip("/")
    if path.endswith(CONVERSATION_SUFFIXES):
        return "conversations"
    if path.endswith(BIO_SUFFIXES) or any(ch in path for ch in "*?["):
        return "bio"
    location = config.locate(uri)
    names = [f.path for f in storage.list_files(location)]
    if any(n.endswith(".parquet") for n in names):
        return "annotations"
    if any(n.endswith(BIO_SUFFIXES) for n in names):
        return "bio"
    raise UserError(f"cannot tell what {uri} holds: set --input-kind to annotations, conversations or bio")


def build(uri: str, config: BuildDataConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Records per output file, and the report, for one input."""
    kind = input_kind(uri, config)
    if kind == "bio":
        outputs, report = from_bio(uri, config)
    else:
        records, report = (from_annotations if kind == "annotations" else from_conversations)(uri, config)
        outputs = {CONVERSATIONS_FILE: records}
    return outputs, {"input": uri, "input_kind": kind, **report}


def keep_share(records: list[dict[str, Any]], share: float, *, seed: int, key: str) -> list[dict[str, Any]]:
    """A seeded sample of `share` of the records, in their original order; the same for the same seed and input."""
    rng = np.random.default_rng([seed, _stable_int(key)])
    kept = rng.choice(len(records), size=round(share * len(records)), replace=False)
    return [records[i] for i in sorted(kept)]


def plan(config: BuildDataConfig) -> list[str]:
    lines = []
    for uri in config.input:
        kind = input_kind(uri, config)
        lines.append(f"read {kind} from {uri}")
        if kind == "annotations":
            lines.append(
                f"  one question per entity type present, plus {config.negatives_per_passage} negative types "
                f"per passage drawn by type frequency (seed {config.seed})"
            )
        elif kind == "bio":
            lines.append(f"  {len(bio_files(uri, config))} BIO file(s), columns {config.bio_column_order}")
    if config.holdout:
        lines.append(f"leave out records whose text is in {', '.join(config.holdout)}")
    if config.window_words:
        lines.append(f"cut texts at sentence ends into windows of at most {config.window_words} words")
    if config.type_forms or config.lowercase_share:
        lines.append(
            f"ask types in varied forms: {config.type_forms}; lower-case {config.lowercase_share:.0%} of records"
        )
    target = "<dataset>.json evaluation queries" if config.eval_queries else CONVERSATIONS_FILE
    return lines + [f"write {target} and _summary.json to {config.output}"]


def _narrow(built: dict[str, list[dict[str, Any]]], select, report: dict[str, Any], reason: str):
    """`select` applied to the records of every output file, with the number it left out counted as `reason`."""
    before = sum(map(len, built.values()))
    built = {name: select(records) for name, records in built.items()}
    report["counts"][reason] = before - sum(map(len, built.values()))
    return built


def run(config: BuildDataConfig) -> dict[str, Any]:
    output = config.locate(config.output)
    heldout = heldout_texts(config)  # read before the output is cleared: a bad --holdout file stops the stage here
    storage.prepare_output(output, overwrite=config.overwrite)
    outputs: dict[str, list[dict[str, Any]]] = {}
    reports = []
    for index, uri in enumerate(config.input):
        built, report = build(uri, config)
        if heldout:
            built = _narrow(
                built,
                lambda records: [r for r in records if text_of(r) not in heldout],
                report,
                "records held out by --holdout",
            )
        if config.window_words and CONVERSATIONS_FILE in built:  # after --holdout, which matches whole texts
            built[CONVERSATIONS_FILE] = [w for r in built[CONVERSATIONS_FILE] for w in windowed(r, config.window_words)]
            report["statistics"]["windowed_records"] = len(built[CONVERSATIONS_FILE])
        if config.input_shares and config.input_shares[index] < 1:  # statistics stay those of the whole input
            share = config.input_shares[index]
            built = _narrow(
                built,
                lambda records: keep_share(records, share, seed=config.seed, key=uri),
                report,
                "records left out by --input-shares",
            )
        for name, records in built.items():
            outputs.setdefault(name, []).extend(records)
        reports.append(report)
        log.info("%s (%s): %d records", uri, report["input_kind"], sum(len(r) for r in built.values()))
    if not any(outputs.values()):
        skipped = "; ".join(f"{what} {n}" for report in reports for what, n in report["counts"].items())
        raise UserError(
            f"no conversation could be built from {', '.join(config.input)} ({skipped or 'no records'}): "
            "check the input, or keep entities the teacher placed outside their passage with "
            "--drop-entities-not-in-text false"
        )
    if (config.type_forms or config.lowercase_share) and CONVERSATIONS_FILE in outputs:  # not evaluation queries
        outputs[CONVERSATIONS_FILE] = [
            vary_forms(r, type_forms=config.type_forms, lowercase_share=config.lowercase_share, seed=config.seed)
            for r in outputs[CONVERSATIONS_FILE]
        ]
    for name, records in outputs.items():
        storage.write_text(output.join(name), dump_records(records))
        log.info("wrote %d records to %s", len(records), output.join(name))
    summary = {
        "output": str(output),
        "files": {name: len(records) for name, records in outputs.items()},
        "records_written": sum(len(records) for records in outputs.values()),
        "inputs": reports,
        "config": to_dict(config),
    }
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{n} records -> {summary['output']}/{name}" for name, n in summary["files"].items()]
    for report in summary["inputs"]:
        stats = report["statistics"]
        lines.append(
            f"{report['input']} ({report['input_kind']}): {stats['entities']} entities of {stats['types']} "
            f"types; {stats['types_seen_once']} types seen once; the top 1% of types hold "
            f"{stats['top_1pct_types_mention_share']:.1%} of mentions"
        )
        if stats["head"]:
            lines.append("  most frequent types: " + ", ".join(f"{t} ({n})" for t, n in stats["head"]))
        lines.extend(f"  {what}: {n}" for what, n in sorted(report["counts"].items()))
        if stats.get("absent_type_questions"):
            lines.append(f"  questions added for absent types (answered []): {stats['absent_type_questions']}")
        if stats.get("windowed_records"):
            lines.append(f"  records after cutting texts into windows: {stats['windowed_records']}")
        if stats.get("type_merges"):
            lines.append(f"  merged {len(stats['type_merges'])} type variants (listed in _summary.json)")
    return lines

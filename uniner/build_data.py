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
import math
import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Iterable

import numpy as np
import pyarrow.dataset as pads

from uniner import bio, storage
from uniner.config import BuildDataConfig, to_dict
from uniner.errors import UserError
from uniner.formats import READ_ACK, question, text_turn

log = logging.getLogger("uniner.build_data")

CONVERSATIONS_FILE = "conversations.json"
BIO_SUFFIXES = (".txt", ".bio", ".conll", ".tsv")
CONVERSATION_SUFFIXES = (".json", ".jsonl")
_TEXT_TURN = re.compile(r"(Dataset: [^\n]*\n)?Text: ", re.DOTALL)


# ---------------------------------------------------------------- conversations


def conversation(record_id: str, text: str, qa: list[tuple[str, list[str]]], *, dataset: str = "") -> dict[str, Any]:
    """One record in the Pile-NER `train.json` shape: the text turn, the read acknowledgement, then one question per
    type answered with the JSON list of its entities (`[]` for a negative type)."""
    turns = [{"from": "human", "value": text_turn(text, dataset=dataset or None)}, {"from": "gpt", "value": READ_ACK}]
    for entity_type, entities in qa:
        turns.append({"from": "human", "value": question(entity_type)})
        turns.append({"from": "gpt", "value": bio.answer(entities)})
    record: dict[str, Any] = {"id": record_id, "conversations": turns}
    if dataset:
        record["dataset"] = dataset
    return record


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


def type_statistics(mentions: Counter, *, head: int = 10) -> dict[str, Any]:
    """Paper-style statistics of a type distribution: mentions, types, the head and the tail."""
    ranked = mentions.most_common()
    total = sum(mentions.values())
    top = math.ceil(len(ranked) / 100)  # the most frequent 1% of types, at least one
    return {
        "entities": total,
        "types": len(ranked),
        "head": [[t, n] for t, n in ranked[:head]],
        "tail": [[t, n] for t, n in ranked[-head:]] if len(ranked) > head else [],
        "types_seen_once": sum(1 for _, n in ranked if n == 1),
        "top_1pct_types": top,
        "top_1pct_types_mention_share": round(sum(n for _, n in ranked[:top]) / total, 4) if total else 0.0,
    }


# ---------------------------------------------------------------- annotations


def _read_annotations(uri: str, config: BuildDataConfig) -> Iterable[dict[str, Any]]:
    location = storage.locate(uri, s3_endpoint_url=config.s3_endpoint_url)
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


def check_conversation(record: Any, where: str, counts: Counter) -> dict[str, Any] | None:
    """Validate one record of the Pile-NER shape. Unanswered trailing questions are dropped (a counted repair);
    a record with no question left is skipped (counted); anything else malformed is a UserError naming it."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or "id" not in record:
        raise UserError(f"{where}: expected {{\"id\": ..., \"conversations\": [{{\"from\", \"value\"}}, ...]}}")
    turns = record["conversations"]
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: turn {index} must be {{\"from\": \"{expected}\", \"value\": <string>}} "
                            "(turns alternate human, gpt)")
    if not turns or not _TEXT_TURN.match(turns[0]["value"]):
        raise UserError(f"{where}: the first turn must be the text (`Text: ...`, or `Dataset: NAME` then `Text: ...`)")
    for index in range(3, len(turns), 2):
        try:
            answer = json.loads(turns[index]["value"])
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, list) or not all(isinstance(a, str) for a in answer):
            raise UserError(f"{where}: answer in turn {index} is not a JSON list of strings: {turns[index]['value'][:80]!r}")
    if len(turns) % 2:
        counts["repairs: unanswered last question dropped"] += 1
        record = {**record, "conversations": turns[:-1]}
    if len(record["conversations"]) < 4:
        counts["records skipped: no question with an answer"] += 1
        return None
    return record


def from_conversations(uri: str, config: BuildDataConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    location = storage.locate(uri, s3_endpoint_url=config.s3_endpoint_url)
    counts: Counter = Counter()
    records, mentions = [], Counter()
    for where, raw in storage.read_json_records(location):
        record = check_conversation(raw, f"{where} (id {raw.get('id') if isinstance(raw, dict) else '?'})", counts)
        if record is None:
            continue
        turns = record["conversations"]
        for index in range(2, len(turns), 2):
            entity_type = turns[index]["value"].removeprefix("What describes ").removesuffix(" in the text?")
            mentions[entity_type] += len(json.loads(turns[index + 1]["value"]))
        records.append(record)
    mentions = +mentions  # types only ever answered [] have no mention
    return records, {"counts": dict(counts), "statistics": {"passages": len(records), **type_statistics(mentions)}}


# ---------------------------------------------------------------- BIO files


def dataset_name_of(uri: str) -> str:
    """A BIO file's dataset name: its folder and stem (`crossner/ai/dev.txt` -> `ai-dev`)."""
    path = PurePosixPath(uri.rstrip("/"))
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def bio_files(uri: str, config: BuildDataConfig) -> list[storage.Location]:
    location = storage.locate(uri, s3_endpoint_url=config.s3_endpoint_url)
    files = [f for f in storage.list_files(location) if f.path.endswith(BIO_SUFFIXES)]
    if not files:
        raise UserError(f"no BIO files ({', '.join(BIO_SUFFIXES)}) at {uri}")
    return files


def eval_queries(data: bio.BioFile, name: str) -> list[dict[str, Any]]:
    """The UniNER evaluation shape: one conversation per (sentence, type), the gold list as the last answer."""
    return [
        conversation(f"{name}-{s}-{t}", sentence.text, [(entity_type, bio.entities_of_type(sentence, entity_type))])
        for s, sentence in enumerate(data.sentences)
        for t, entity_type in enumerate(data.types)
    ]


def from_bio(uri: str, config: BuildDataConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Conversations per BIO file: every type of the file's label set asked of every sentence (absent ones answer
    []), with `Dataset: NAME` before the text when --dataset-name is set."""
    label_map = bio.read_label_map(config.label_map, s3_endpoint_url=config.s3_endpoint_url)
    outputs: dict[str, list[dict[str, Any]]] = {}
    counts: Counter = Counter()
    mentions: Counter = Counter()
    for location in bio_files(uri, config):
        data = bio.read_bio(str(location), column_order=config.bio_column_order, label_map=label_map,
                            s3_endpoint_url=config.s3_endpoint_url)
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


# ---------------------------------------------------------------- the stage


def input_kind(uri: str, config: BuildDataConfig) -> str:
    if config.input_kind != "auto":
        return config.input_kind
    path = uri.rstrip("/")
    if path.endswith(CONVERSATION_SUFFIXES):
        return "conversations"
    if path.endswith(BIO_SUFFIXES) or any(ch in path for ch in "*?["):
        return "bio"
    location = storage.locate(uri, s3_endpoint_url=config.s3_endpoint_url)
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


def dump_records(records: list[dict[str, Any]]) -> str:
    """A JSON list with one record per line: valid `train.json`, and readable with `head`."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def plan(config: BuildDataConfig) -> list[str]:
    lines = []
    for uri in config.input:
        kind = input_kind(uri, config)
        lines.append(f"read {kind} from {uri}")
        if kind == "annotations":
            lines.append(f"  one question per entity type present, plus {config.negatives_per_passage} negative types "
                         f"per passage drawn by type frequency (seed {config.seed})")
        elif kind == "bio":
            lines.append(f"  {len(bio_files(uri, config))} BIO file(s), columns {config.bio_column_order}")
    target = "<dataset>.json evaluation queries" if config.eval_queries else CONVERSATIONS_FILE
    return lines + [f"write {target} and _summary.json to {config.output}"]


def run(config: BuildDataConfig) -> dict[str, Any]:
    output = storage.locate(config.output, s3_endpoint_url=config.s3_endpoint_url)
    storage.prepare_output(output, overwrite=config.overwrite)
    outputs: dict[str, list[dict[str, Any]]] = {}
    reports = []
    for index, uri in enumerate(config.input):
        built, report = build(uri, config)
        if config.input_shares and config.input_shares[index] < 1:  # statistics stay those of the whole input
            before = sum(map(len, built.values()))
            built = {name: keep_share(records, config.input_shares[index], seed=config.seed, key=uri)
                     for name, records in built.items()}
            report["counts"]["records left out by --input-shares"] = before - sum(map(len, built.values()))
        for name, records in built.items():
            outputs.setdefault(name, []).extend(records)
        reports.append(report)
        log.info("%s (%s): %d records", uri, report["input_kind"], sum(len(r) for r in built.values()))
    if not any(outputs.values()):
        skipped = "; ".join(f"{what} {n}" for report in reports for what, n in report["counts"].items())
        raise UserError(f"no conversation could be built from {', '.join(config.input)} ({skipped or 'no records'}): "
                        "check the input, or keep entities the teacher placed outside their passage with "
                        "--drop-entities-not-in-text false")
    for name, records in outputs.items():
        storage.write_text(output.join(name), dump_records(records))
        log.info("wrote %d records to %s", len(records), output.join(name))
    summary = {"output": str(output), "files": {name: len(records) for name, records in outputs.items()},
               "records_written": sum(len(records) for records in outputs.values()), "inputs": reports,
               "config": to_dict(config)}
    storage.write_json(output.join("_summary.json"), summary)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{n} records -> {summary['output']}/{name}" for name, n in summary["files"].items()]
    for report in summary["inputs"]:
        stats = report["statistics"]
        lines.append(f"{report['input']} ({report['input_kind']}): {stats['entities']} entities of {stats['types']} "
                     f"types; {stats['types_seen_once']} types seen once; the top 1% of types hold "
                     f"{stats['top_1pct_types_mention_share']:.1%} of mentions")
        if stats["head"]:
            lines.append("  most frequent types: " + ", ".join(f"{t} ({n})" for t, n in stats["head"]))
        lines.extend(f"  {what}: {n}" for what, n in sorted(report["counts"].items()))
        if stats.get("type_merges"):
            lines.append(f"  merged {len(stats['type_merges'])} type variants (listed in _summary.json)")
    return lines

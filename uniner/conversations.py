"""The UniNER conversations as records: building one, checking one, reading its parts back, and the statistics of
the types they ask. The strings themselves (the question, the text turn, the read acknowledgement) are in
uniner/formats.py; build-data writes these records, and train and evaluate read them.

A record is the Pile-NER `train.json` shape: `{id, conversations: [{from, value}], dataset?}`, turns alternating
human and gpt: the text, the read acknowledgement, then one question per type and its answer, a JSON list.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

from uniner import bio
from uniner.errors import UserError
from uniner.formats import READ_ACK, question, text_turn

_TEXT_TURN = re.compile(r"(Dataset: [^\n]*\n)?Text: ", re.DOTALL)


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


def check_conversation(record: Any, where: str, counts: Counter) -> dict[str, Any] | None:
    """Validate one record of the Pile-NER shape. Unanswered trailing questions are dropped (a counted repair);
    a record with no question left is skipped (counted); anything else malformed is a UserError naming it."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or "id" not in record:
        raise UserError(f'{where}: expected {{"id": ..., "conversations": [{{"from", "value"}}, ...]}}')
    turns = record["conversations"]
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise UserError(
                f'{where}: turn {index} must be {{"from": "{expected}", "value": <string>}} '
                "(turns alternate human, gpt)"
            )
    if not turns or not _TEXT_TURN.match(turns[0]["value"]):
        raise UserError(f"{where}: the first turn must be the text (`Text: ...`, or `Dataset: NAME` then `Text: ...`)")
    for index in range(3, len(turns), 2):
        try:
            answer = json.loads(turns[index]["value"])
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, list) or not all(isinstance(a, str) for a in answer):
            raise UserError(
                f"{where}: answer in turn {index} is not a JSON list of strings: {turns[index]['value'][:80]!r}"
            )
    if len(turns) % 2:
        counts["repairs: unanswered last question dropped"] += 1
        record = {**record, "conversations": turns[:-1]}
    if len(record["conversations"]) < 4:
        counts["records skipped: no question with an answer"] += 1
        return None
    return record


def dataset_name_of(uri: str) -> str:
    """A BIO file's dataset name: its folder and stem (`crossner/ai/dev.txt` -> `ai-dev`)."""
    path = PurePosixPath(uri.rstrip("/"))
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def eval_queries(data: bio.BioFile, name: str) -> list[dict[str, Any]]:
    """The UniNER evaluation shape: one conversation per (sentence, type), the gold list as the last answer."""
    return [
        conversation(f"{name}-{s}-{t}", sentence.text, [(entity_type, bio.entities_of_type(sentence, entity_type))])
        for s, sentence in enumerate(data.sentences)
        for t, entity_type in enumerate(data.types)
    ]


def question_type(value: str) -> str:
    return value.removeprefix("What describes ").removesuffix(" in the text?")


def text_of(record: dict[str, Any]) -> str:
    return record["conversations"][0]["value"].partition("Text: ")[2]


def questions_and_answers(record: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(type, entities) of each question a checked record asks, in its order."""
    turns = record["conversations"]
    return [(question_type(turns[i]["value"]), json.loads(turns[i + 1]["value"])) for i in range(2, len(turns), 2)]


def dump_records(records: list[dict[str, Any]]) -> str:
    """A JSON list with one record per line: valid `train.json`, and readable with `head`."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


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

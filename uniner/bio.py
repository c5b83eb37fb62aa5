"""Labelled NER files in BIO/CoNLL columns: reading, label names as natural-language types, entity spans.

Tokens are joined with single spaces into the sentence text (as the UniNER evaluation files are), so every
entity has exact character offsets into that text.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import yaml

from uniner import storage
from uniner.errors import UserError

log = logging.getLogger(__name__)

COLUMN_ORDERS = ("auto", "token-tag", "tag-token")

# docs/design.md section 3: the types the UniNER evaluation asks for. `None` drops a label (never queried).
LABEL_TYPES: dict[str, str | None] = {
    "misc": None,
    "MISC": None,
    "programlang": "program language",
    "organisation": "organization",
    "literarygenre": "literary genre",
    "musicalartist": "musical artist",
    "musicalinstrument": "musical instrument",
    "musicgenre": "music genre",
    "politicalparty": "political party",
    "academicjournal": "academic journal",
    "astronomicalobject": "astronomical object",
    "chemicalcompound": "chemical compound",
    "chemicalelement": "chemical element",
    "RATINGS_AVERAGE": "average ratings",
}


def natural_type(label: str, label_map: dict[str, str | None] | None = None) -> str | None:
    """The type asked for a BIO label: a user map first, then the built-in one; otherwise upper-case labels become
    lower-case words (MIT Movie) and underscores become spaces with case kept (MIT Restaurant)."""
    for mapping in (label_map or {}, LABEL_TYPES):
        if label in mapping:
            return mapping[label]
    words = label.replace("_", " ")
    return words.lower() if label.isupper() else words


def read_label_map(uri: str, *, s3_endpoint_url: str = "") -> dict[str, str | None]:
    """A YAML or JSON mapping of BIO label -> type (null drops the label)."""
    if not uri:
        return {}
    location = storage.locate(uri, s3_endpoint_url=s3_endpoint_url)
    try:
        mapping = yaml.safe_load(storage.read_text(location))
    except yaml.YAMLError as error:
        raise UserError(f"label map {uri} is not valid YAML/JSON ({error.__class__.__name__}); fix the file") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, type(None))) for v in mapping.values()):
        raise UserError(f"label map {uri} must be a mapping of label -> type name (or null to drop the label)")
    return {str(k): v for k, v in mapping.items()}


@dataclass
class Entity:
    text: str
    type: str
    start: int
    end: int


@dataclass
class Sentence:
    """One sentence of a BIO file: its text (tokens joined by spaces) and its entities, with offsets."""

    text: str
    entities: list[Entity]
    line: int  # first line of the sentence in its file, for messages


@dataclass
class BioFile:
    name: str
    sentences: list[Sentence]
    types: list[str]  # every type of the file's label set, most frequent first
    repairs: Counter = field(default_factory=Counter)


def _is_tag(column: str) -> bool:
    return column == "O" or (column[:2] in ("B-", "I-") and len(column) > 2)


def detect_column_order(text: str) -> str:
    """tag-token when the first column of the first line holds a tag and the second does not (MIT files)."""
    first = next((line.split("\t") for line in text.splitlines() if line.strip()), [])
    return "tag-token" if len(first) == 2 and _is_tag(first[0]) and not _is_tag(first[1]) else "token-tag"


def read_bio(
    uri: str, *, column_order: str = "auto", label_map: dict[str, str | None] | None = None, s3_endpoint_url: str = ""
) -> BioFile:
    """Read one BIO file. A malformed line is a UserError with file and line; an `I-` tag that does not continue an
    entity of its type starts a new entity, and is counted in `repairs`."""
    if column_order not in COLUMN_ORDERS:
        raise UserError(f"unknown BIO column order {column_order!r}: use {' or '.join(COLUMN_ORDERS)}")
    location = storage.locate(uri, s3_endpoint_url=s3_endpoint_url)
    try:
        text = storage.read_text(location)
    except UnicodeDecodeError:
        raise UserError(f"{uri} is not UTF-8 text; convert it to UTF-8") from None
    name = PurePosixPath(location.path).name
    if column_order == "auto":
        column_order = detect_column_order(text)
    rows: list[tuple[int, str, str]] = []
    sentences: list[Sentence] = []
    label_counts: Counter = Counter()
    repairs: Counter = Counter()
    for number, raw in enumerate(text.splitlines() + [""], start=1):
        line = raw.strip("\r\n")
        if not line.strip():
            if rows:
                sentences.append(_sentence(rows, label_map, label_counts, repairs, name))
                rows = []
            continue
        columns = line.split("\t")
        if len(columns) != 2:
            order = "token<TAB>tag" if column_order == "token-tag" else "tag<TAB>token"
            raise UserError(
                f"{location}:{number}: expected 2 tab-separated columns ({order}), found {len(columns)}; "
                "fix the line or check --bio-column-order"
            )
        token, tag = columns if column_order == "token-tag" else reversed(columns)
        if not _is_tag(tag):
            hint = " (the columns may be swapped: check --bio-column-order)" if _is_tag(token) else ""
            raise UserError(f"{location}:{number}: tag {tag!r} is not O, B-TYPE or I-TYPE{hint}")
        rows.append((number, token, tag))
    if not sentences:
        raise UserError(f"{location} holds no sentences: give a non-empty BIO file")
    types = [t for t, _ in label_counts.most_common() if t is not None]
    for what, count in repairs.items():
        log.warning("%s: %d x %s", location, count, what)
    return BioFile(name=name, sentences=sentences, types=types, repairs=repairs)


def _sentence(
    rows: list[tuple[int, str, str]], label_map, label_counts: Counter, repairs: Counter, name: str
) -> Sentence:
    tokens = [token for _, token, _ in rows]
    starts = []
    offset = 0
    for token in tokens:
        starts.append(offset)
        offset += len(token) + 1
    text = " ".join(tokens)
    spans: list[list] = []  # [first token, last token, label]
    for index, (_, _, tag) in enumerate(rows):
        if tag == "O":
            continue
        prefix, label = tag[:2], tag[2:]
        continues = prefix == "I-" and spans and spans[-1][2] == label and spans[-1][1] == index - 1
        if continues:
            spans[-1][1] = index
        else:
            if prefix == "I-":
                repairs["I- tag starting an entity (read as B-)"] += 1
            spans.append([index, index, label])
    entities = []
    for first, last, label in spans:
        entity_type = natural_type(label, label_map)
        label_counts[entity_type] += 1
        if entity_type is None:
            continue
        start, end = starts[first], starts[last] + len(tokens[last])
        entities.append(Entity(text=text[start:end], type=entity_type, start=start, end=end))
    return Sentence(text=text, entities=entities, line=rows[0][0])


def answer(entities: list[str]) -> str:
    """A gold answer as the UniNER data writes it: the JSON list of entity strings (ASCII-escaped, like json.dumps)."""
    return json.dumps(entities)


def entities_of_type(sentence: Sentence, entity_type: str) -> list[str]:
    """The sentence's entity strings of one type, in order of appearance, without duplicates."""
    return list(dict.fromkeys(e.text for e in sentence.entities if e.type == entity_type))

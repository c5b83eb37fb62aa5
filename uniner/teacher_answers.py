"""Reading a teacher's answer: the list of (entity, type) tuples, as teachers really write it, and the paper's filters.

Teachers answer `[("Paris", "city"), ...]`, but also in JSON (`[["Paris", "city"]]`), in single quotes, inside code
fences, with a sentence before or after, or cut off at the token limit in the middle of a tuple. `parse_pairs`
accepts all of these and says why when it finds nothing usable; `filter_pairs` applies the paper's filters (drop
"else"-like types and non-English entities) plus ours (flag entities that do not occur in the passage).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from uniner.formats import decode_literal

_FENCE = re.compile(r"```[a-zA-Z]*")
_STRING = r'"(?:[^"\\\n]|\\.)*"' + r"|'(?:[^'\\\n]|\\.)*'"
# One pair: a tuple or a JSON list of two quoted strings. Used when the whole list does not decode (e.g. truncated).
_PAIR = re.compile(r"[(\[]\s*(" + _STRING + r")\s*,\s*(" + _STRING + r")\s*[)\]]")
_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry|i cannot|i can'?t|i'?m unable|i am unable|as an ai)\b", re.I)
# Types that say "no real type" (the paper's "else" kind), compared lowercased without punctuation.
ELSE_TYPES = frozenset(
    {"", "none", "na", "n a", "null", "nil", "misc", "miscellaneous", "else", "other", "others", "unknown", "o"}
)


@dataclass
class Parsed:
    """What an answer held: the pairs, how many items were not pairs, and why nothing was usable (if so)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped_items: int = 0
    truncated: bool = False
    problem: str = ""


def _as_pair(item: object) -> tuple[str, str] | None:
    if isinstance(item, dict):
        item = (item.get("entity", item.get("text")), item.get("type"))
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    return None


def looks_like_refusal(answer: str) -> bool:
    """An answer that declines the task instead of giving a list."""
    return bool(_REFUSAL.match(answer)) and "[" not in answer


def parse_pairs(answer: str) -> Parsed:
    """The (entity, type) pairs of a teacher answer; `problem` names why, when the answer held no usable list."""
    text = _FENCE.sub("", answer)
    start = text.find("[")
    if start < 0:
        return Parsed(problem="no list in the answer")
    # The list ends at its last `]`, or earlier when text with brackets follows it: try the longest first.
    ends = sorted(
        {i for i in (text.rfind("]"), text.find("]\n", start), text.find("] ", start)) if i > start}, reverse=True
    )
    for end in ends:
        items = decode_literal(text[start : end + 1])
        if isinstance(items, (list, tuple)):
            pairs = [pair for pair in map(_as_pair, items) if pair is not None]
            if items and not pairs:
                return Parsed(skipped_items=len(items), problem="the list holds no (entity, type) pairs")
            return Parsed(pairs=pairs, skipped_items=len(items) - len(pairs))
    # Not a whole literal: keep every complete pair; an unfinished last tuple is what a cut-off answer leaves.
    matches = list(_PAIR.finditer(text, start))
    pairs = [(decode_literal(m[1]), decode_literal(m[2])) for m in matches]
    pairs = [(e, t) for e, t in pairs if isinstance(e, str) and isinstance(t, str)]
    if not pairs:
        return Parsed(problem="a list that is neither JSON nor a Python literal, with no complete (entity, type) pair")
    return Parsed(pairs=pairs, truncated="]" not in text[matches[-1].end() :])


def _normal_type(entity_type: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", entity_type.lower()).split())


def is_english(entity: str) -> bool:
    """Every letter is Latin script (the paper drops non-English entities; digits and symbols are neutral)."""
    return all(not ch.isalpha() or unicodedata.name(ch, "").startswith("LATIN") for ch in entity)


def filter_pairs(pairs: list[tuple[str, str]], passage: str) -> tuple[list[dict], list[dict]]:
    """Kept entities (`text`, `type`, `in_passage`) and dropped ones (`text`, `type`, `reason`)."""
    kept: list[dict] = []
    dropped: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for raw_entity, raw_type in pairs:
        entity, entity_type = raw_entity.strip(), raw_type.strip()
        reason = ""
        if not entity:
            reason = "empty entity"
        elif _normal_type(entity_type) in ELSE_TYPES:
            reason = "else-like type"
        elif not is_english(entity):
            reason = "non-English entity"
        elif (entity, entity_type) in seen:
            reason = "duplicate"
        if reason:
            dropped.append({"text": entity, "type": entity_type, "reason": reason})
            continue
        seen.add((entity, entity_type))
        kept.append({"text": entity, "type": entity_type, "in_passage": entity in passage})
    return kept, dropped

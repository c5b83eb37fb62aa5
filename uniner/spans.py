"""Entity strings -> character spans of a document, the merge rules, and the export formats.

The model answers with strings, not offsets. Each string is found in the text it was asked about, at every
occurrence with word boundaries (a match must not start or end inside a word of a spaced script); a run of
whitespace in the answer matches any run of whitespace in the text. A string found nowhere is kept apart as
unmatched. Every span's `text` is `document[start:end]`, so with `case_sensitive=False` it holds the document's
spelling, not the model's.
"""

from __future__ import annotations

import bisect
import html
import json
import re
import unicodedata
from collections.abc import Iterable

Entity = dict  # {"text", "type", "start", "end"}

# Scripts written without spaces: one token per character.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_UNSPACED}]|(?:(?![{_UNSPACED}])\w)+|[^\w\s]")


def _is_word_char(char: str) -> bool:
    """A letter or digit of a script that separates words with spaces (CJK and kana/hangul do not)."""
    if not (char.isalnum() or char == "_"):
        return False
    name = unicodedata.name(char, "")
    return not name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


def _pattern(entity: str, case_sensitive: bool) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(word) for word in entity.split())
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)


def find_spans(
    text: str,
    entity: str,
    *,
    case_sensitive: bool = True,
    whole_words: bool = True,
    start: int = 0,
    end: int | None = None,
) -> list[tuple[int, int]]:
    """Every (start, end) where `entity` occurs in text[start:end], as offsets into `text`.

    With `whole_words`, a match may not start or end inside a word of a spaced script ("York" is not in "Yorkshire").
    """
    end = len(text) if end is None else end
    if not entity.strip():
        return []
    spans = []
    for match in _pattern(entity, case_sensitive).finditer(text, start, end):
        s, e = match.span()
        if not whole_words:
            spans.append((s, e))
            continue
        if _is_word_char(text[s]) and s > 0 and _is_word_char(text[s - 1]):
            continue
        if _is_word_char(text[e - 1]) and e < len(text) and _is_word_char(text[e]):
            continue
        spans.append((s, e))
    return spans


def locate(
    text: str,
    answers: Iterable[tuple[str, str]],
    *,
    case_sensitive: bool = True,
    whole_words: bool = True,
    start: int = 0,
    end: int | None = None,
) -> tuple[list[Entity], list[dict]]:
    """Spans of (entity string, type) answers within text[start:end]; and the answers found nowhere there."""
    entities, unmatched = [], []
    for entity, entity_type in answers:
        entity = entity.strip()
        if not entity:
            continue
        spans = find_spans(text, entity, case_sensitive=case_sensitive, whole_words=whole_words, start=start, end=end)
        if not spans:
            unmatched.append({"text": entity, "type": entity_type})
        entities.extend({"text": text[s:e], "type": entity_type, "start": s, "end": e} for s, e in spans)
    return entities, unmatched


class _Disjoint:
    """A growing set of non-overlapping spans; `add` takes a span only if it overlaps none already there."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> bool:
        index = bisect.bisect_right(self.starts, start)
        if index > 0 and self.ends[index - 1] > start:
            return False
        if index < len(self.starts) and self.starts[index] < end:
            return False
        self.starts.insert(index, start)
        self.ends.insert(index, end)
        return True


def _longest_first(entities: Iterable[Entity]) -> list[Entity]:
    return sorted(entities, key=lambda e: (e["start"] - e["end"], e["start"]))


def merge(entities: Iterable[Entity]) -> list[Entity]:
    """Exact duplicates removed; of overlapping spans of one type, the longest kept (the earliest on a tie).

    Spans of different types may overlap: each answered its own question.
    """
    unique = {(e["start"], e["end"], e["type"]): e for e in entities}.values()
    taken: dict[str, _Disjoint] = {}
    kept = [e for e in _longest_first(unique) if taken.setdefault(e["type"], _Disjoint()).add(e["start"], e["end"])]
    return sorted(kept, key=lambda e: (e["start"], e["end"], e["type"]))


def merge_unmatched(unmatched: Iterable[dict]) -> list[dict]:
    """Unmatched answers, each (text, type) once, in first-seen order."""
    return list({(u["text"], u["type"]): u for u in unmatched}.values())


# ---- exports ----


def non_overlapping(entities: list[Entity]) -> list[Entity]:
    """Longest first, then earliest: a flat set of spans for formats that cannot overlap (BIO)."""
    taken = _Disjoint()
    return sorted((e for e in _longest_first(entities) if taken.add(e["start"], e["end"])), key=lambda e: e["start"])


def tokens(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word or punctuation mark."""
    return [m.span() for m in _TOKEN.finditer(text)]


def _covered(starts: list[int], ends: list[int], entity: Entity) -> range:
    """Indices of the tokens that overlap an entity, given the sorted token starts and ends."""
    return range(bisect.bisect_right(ends, entity["start"]), bisect.bisect_left(starts, entity["end"]))


def _token_tags(text: str, entities: list[Entity]) -> tuple[list[tuple[int, int]], list[str]]:
    spans = tokens(text)
    tags = ["O"] * len(spans)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    for entity in non_overlapping(entities):
        for n, i in enumerate(_covered(starts, ends, entity)):
            tags[i] = ("B-" if n == 0 else "I-") + entity["type"]
    return spans, tags


def to_conll(doc_id: str, text: str, entities: list[Entity]) -> str:
    """One document in CoNLL/BIO: a `# id = ...` line, then `token<TAB>tag` lines, then a blank line."""
    spans, tags = _token_tags(text, entities)
    lines = [f"# id = {doc_id}"] + [f"{text[s:e]}\t{tag}" for (s, e), tag in zip(spans, tags)]
    return "\n".join(lines) + "\n\n"


def to_spacy(doc_id: str, text: str, entities: list[Entity]) -> str:
    """One JSON line in spaCy's offsets shape: {"id", "text", "ents": [{"start", "end", "label"}]}."""
    ents = [{"start": e["start"], "end": e["end"], "label": e["type"]} for e in entities]
    return json.dumps({"id": doc_id, "text": text, "ents": ents}, ensure_ascii=False) + "\n"


def to_gliner(doc_id: str, text: str, entities: list[Entity]) -> str:
    """One JSON line in GLiNER's training shape: tokens and [first token, last token (inclusive), label] spans."""
    spans = tokens(text)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    ner = []
    for entity in entities:
        inside = _covered(starts, ends, entity)
        if inside:
            ner.append([inside[0], inside[-1], entity["type"]])
    return (
        json.dumps({"id": doc_id, "tokenized_text": [text[s:e] for s, e in spans], "ner": ner}, ensure_ascii=False)
        + "\n"
    )


EXPORTS = {"conll": ("conll.txt", to_conll), "spacy": ("spacy.jsonl", to_spacy), "gliner": ("gliner.jsonl", to_gliner)}

# ---- a page to look at ----

HTML_FILE = "entities.html"
# Colour-blind-safe background colours (Okabe-Ito, lightened), taken in order of type frequency.
PALETTE = ["#f6c89f", "#a6d8f5", "#9fe0c9", "#f9ec9a", "#b7cdea", "#f0b8a0", "#e3bcd4", "#d9d9d9"]


def html_page(
    documents: list[tuple[str, str, list[Entity]]], *, counts: dict[str, int], total_documents: int, title: str
) -> str:
    """A self-contained page: a legend with the count of each type over every document, then `documents`
    (doc_id, text, entities) with each entity highlighted in its type's colour (overlaps: longest first)."""
    types = sorted(counts, key=lambda t: (-counts[t], t))
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(types)}
    legend = "".join(
        f'<li><mark style="background:{colour[t]}">{html.escape(t)}</mark> {counts[t]}</li>' for t in types
    )
    shown = "" if len(documents) == total_documents else f" ({len(documents)} shown)"
    body = "".join(
        f"<article><h2>{html.escape(doc_id)}</h2><p>{_highlighted(text, entities, colour)}</p></article>"
        for doc_id, text, entities in documents
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{sum(counts.values())} entities in {total_documents} documents"
        f'{shown}</p><ul class="legend">{legend}</ul></header><main>{body}</main></body></html>\n'
    )


def _highlighted(text: str, entities: list[Entity], colour: dict[str, str]) -> str:
    parts, at = [], 0
    for entity in non_overlapping(entities):
        start, end, kind = entity["start"], entity["end"], entity["type"]
        parts.append(html.escape(text[at:start]))
        parts.append(
            f'<mark style="background:{colour.get(kind, PALETTE[-1])}" title="{html.escape(kind)}">'
            f"{html.escape(text[start:end])}<span>{html.escape(kind)}</span></mark>"
        )
        at = end
    parts.append(html.escape(text[at:]))
    return "".join(parts)


_PAGE_STYLE = (
    "body{font:16px/1.6 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 2rem;color:#222}"
    "header{border-bottom:1px solid #ccc;margin-bottom:1rem}h1{font-size:1.4rem}h2{font-size:.8rem;color:#777;"
    "margin:1.2rem 0 .2rem}ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.4rem 1.2rem}"
    "mark{border-radius:.3rem;padding:.05rem .25rem}mark span{font-size:.65rem;font-weight:600;margin-left:.3rem;"
    "text-transform:uppercase;color:#444}p{margin:0;white-space:pre-wrap}"
    # A long unbroken run (a URL, a rule of dashes) wraps instead of widening the page past the window.
    "h1,p{overflow-wrap:anywhere}"
)

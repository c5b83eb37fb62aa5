"""Splitting a document into passages of at most `max_tokens` tokens of a given tokenizer.

Cuts fall at paragraph breaks where possible, else at sentence ends, else between words (or between CJK
characters); only a single "word" longer than the bound is cut inside, at a token boundary, and counted. A passage
is `document[start:end]` with surrounding whitespace left out, so its offsets map back into the document.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

# Long documents are tokenized a window at a time so that memory stays bounded (a 50 MB line is fine).
WINDOW_CHARS = 100_000
# A cut at a better kind of boundary must keep at least this share of the room a passage has.
MIN_FILL = 0.5

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_HAS_CJK = re.compile(f"[{_CJK}]")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
# Where a sentence ends: after its final punctuation and any closing quote or bracket.
SENTENCE_END = re.compile(rf"(?<=[.!?\u2026\u3002\uff01\uff1f])[\"'\u201d\u2019)\]]*(?=\s|[{_CJK}])")
_SPACE = re.compile(r"\s+")
# Between two characters of a script written without spaces, or after its punctuation.
_CJK_GAP = re.compile(rf"(?<=[{_CJK}\u3001\u3002\uff0c])(?=\S)|(?<=\S)(?=[{_CJK}])")
# Where to look for the end of a window: its last stretch is enough.
WINDOW_TAIL = 5_000


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    n_tokens: int
    forced: bool = False  # cut inside an over-long word


class Chunker:
    """Cuts text into token-bounded spans with one tokenizer (a Hugging Face fast tokenizer)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def spans(self, text: str) -> list[Span]:
        """Passages of `text`, in order, covering all of its non-whitespace characters."""
        spans: list[Span] = []
        start = _skip_space(text, 0, len(text))
        while start < len(text):
            end = len(text) if len(text) - start <= WINDOW_CHARS else self._window_end(text, start)
            spans.extend(self._window(text, start, end))
            start = _skip_space(text, end, len(text))
        return spans

    def _window_end(self, text: str, start: int) -> int:
        limit = start + WINDOW_CHARS
        tail = limit - WINDOW_TAIL
        return _Boundaries(text, tail, limit).best(tail, limit) or limit

    def _window(self, text: str, start: int, end: int) -> list[Span]:
        encoding = self.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        token_ends = [start + e for _, e in encoding["offset_mapping"]]
        boundaries = _Boundaries(text, start, end)
        spans = []
        pos = start
        while pos < end:
            first = bisect.bisect_right(token_ends, pos)
            last = min(first + self.max_tokens, len(token_ends))
            limit = end if last == len(token_ends) else token_ends[last - 1]
            span = self._fit(text, pos, max(limit, pos + 1), end, boundaries)
            spans.append(span)
            pos = _skip_space(text, span.end, end)
        return spans

    def _fit(self, text: str, pos: int, limit: int, end: int, boundaries: _Boundaries) -> Span:
        """The longest passage from `pos` that ends at a good boundary and truly holds at most max_tokens tokens."""
        while True:
            forced = False
            if limit >= end or not text[limit:end].strip():
                cut = end
            else:
                cut = boundaries.best(pos, limit)
                if cut is None:
                    cut, forced = limit, True
            stop = _trim_end(text, pos, cut)
            n_tokens = self.count(text[pos:stop])
            if n_tokens <= self.max_tokens or stop - pos <= 1:
                return Span(pos, stop, n_tokens, forced)
            # Tokens merge differently at a cut than inside the window: step back and try again.
            limit = pos + max(1, (cut - pos) * self.max_tokens // n_tokens - 1)


class _Boundaries:
    """Candidate cut positions (where a passage may end) of one text window, by kind."""

    def __init__(self, text: str, start: int, end: int):
        window = text[start:end]
        words = [start + m.start() for m in _SPACE.finditer(window)]
        if _HAS_CJK.search(window):
            words = sorted(set(words).union(start + m.start() for m in _CJK_GAP.finditer(window)))
        self.kinds = [
            [start + m.start() for m in _PARAGRAPH.finditer(window)],
            [start + m.end() for m in SENTENCE_END.finditer(window)],
            words,
        ]

    def best(self, pos: int, limit: int) -> int | None:
        """The last cut in (pos, limit] of the best kind that keeps at least MIN_FILL of the room; any cut else."""
        floor = pos + int((limit - pos) * MIN_FILL)
        fallback = None
        for cuts in self.kinds:
            index = bisect.bisect_right(cuts, limit) - 1
            if index >= 0 and cuts[index] > pos:
                if cuts[index] >= floor:
                    return cuts[index]
                fallback = max(fallback or 0, cuts[index])
        return fallback


def _skip_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _trim_end(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end

"""Chunking: the token bound, the offset invariant on any text, and where cuts fall."""

import random

import pytest

from uniner.chunking import Chunker
from uniner.corpus import document

UNICODE_TEXT = (
    "Émile Zola naquit à Paris. Ça va? Ünïcödé façade, naïve café.\n\n"
    "東京は日本の首都です。大阪も大きな都市です。\n\n"
    "Emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵 sit between words. 서울은 한국의 수도입니다.\n\n"
) * 12


@pytest.fixture(scope="module")
def chunker(tokenizer):
    return Chunker(tokenizer, 32)


@pytest.mark.parametrize(
    "text",
    [UNICODE_TEXT, document(random.Random(1)) * 5, "x" * 3000, "a\n" * 2000, "   \n\n  padded  \n"],
    ids=["unicode", "news", "one-long-word", "short-lines", "padded"],
)
def test_offsets_and_token_bound(chunker, text):
    spans = chunker.spans(text)
    assert spans
    previous_end = 0
    for span in spans:
        piece = text[span.start : span.end]
        assert piece == piece.strip() and piece
        assert span.n_tokens == chunker.count(piece) <= 32
        assert span.start >= previous_end
        assert not text[previous_end : span.start].strip()  # nothing but whitespace is left out
        previous_end = span.end
    assert not text[previous_end:].strip()


def test_cuts_prefer_paragraphs_then_sentences_and_never_split_words(chunker):
    paragraph = "Alice met Bob in Paris last spring. They talked about work, family and the long road ahead."
    assert 16 < chunker.count(paragraph) <= 32  # one fits in a passage, two do not
    text = "\n\n".join([paragraph] * 3)
    assert [text[s.start : s.end] for s in chunker.spans(text)] == [paragraph] * 3
    long_sentences = " ".join(f"Sentence number {i} speaks of Lyon and Accra." for i in range(20))
    for span in chunker.spans(long_sentences):
        assert long_sentences[span.start : span.end].endswith(".")
    words = " ".join(["extraordinarily"] * 200)
    for span in chunker.spans(words):
        assert set(words[span.start : span.end].split()) == {"extraordinarily"}
        assert not span.forced


def test_only_an_over_long_word_is_cut_inside_and_flagged(chunker):
    text = "short words " + "z" * 500 + " more words"
    spans = chunker.spans(text)
    assert [s.forced for s in spans].count(True) >= 1
    assert "".join(text[s.start : s.end] for s in spans if s.forced or "z" in text[s.start : s.end]).count("z") == 500


def test_long_documents_are_processed_in_windows(tokenizer):
    rng = random.Random(2)
    text = "\n\n".join(document(rng) for _ in range(900))  # several windows of 100,000 characters
    assert len(text) > 300_000
    chunker = Chunker(tokenizer, 256)
    spans = chunker.spans(text)
    assert all(s.n_tokens <= 256 and text[s.start : s.end].strip() == text[s.start : s.end] for s in spans)
    covered = sum(len(text[s.start : s.end].split()) for s in spans)
    assert covered == len(text.split())

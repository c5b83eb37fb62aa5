"""Conversations -> token ids and loss masks for training, and length-grouped micro-batches.

Tokenization follows docs/design.md section 2: `Template.segments` splits a conversation into prompt pieces (ending
`ASSISTANT:`) and answer pieces (starting with the space, ending with the student's EOS); each piece is tokenized on
its own, without special tokens, and the pieces are concatenated. A prompt cut at its last `ASSISTANT:` is then
token for token the inference prompt. The loss falls only on answer pieces, `I've read this text.` included.

Batching groups conversations of similar length instead of packing several into one row: it keeps attention inside
each conversation with every attention kernel (eager and SDPA on CPU, flash on GPU) without varlen masks, and a
window of a few dozen micro-batches sorted by length leaves little padding (benchmarks/train_throughput.py).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from uniner.errors import UserError
from uniner.formats import Template

IGNORE_INDEX = -100
TOKENS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
        ("n_tokens", pa.int64()),
        ("n_label_tokens", pa.int64()),
        ("turns_cut", pa.int64()),  # question/answer pairs left out to stay within max_length
        ("reason", pa.string()),  # null when the conversation is trainable
        ("detail", pa.string()),
    ]
)


def conversation_rng(seed: int, conversation_id: str) -> random.Random:
    """A generator that depends only on the seed and the conversation id, whatever the partitioning."""
    return random.Random(hashlib.sha1(f"{seed}\x00{conversation_id}".encode()).digest())


def shuffled_turns(turns: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """The first exchange (text, acknowledgement) stays first; the question/answer pairs after it are shuffled."""
    head, rest = turns[:2], turns[2:]
    pairs = [rest[i : i + 2] for i in range(0, len(rest), 2)]
    rng.shuffle(pairs)
    return head + [turn for pair in pairs for turn in pair]


class TooLong(ValueError):
    """The text turn and its first answer alone exceed max_length."""


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]
    turns_cut: int


class ConversationTokenizer:
    """Tokenizes conversations with the template and the loss mask; cuts long ones at a turn boundary."""

    def __init__(self, tokenizer: Any, *, max_length: int):
        self.tokenizer = tokenizer
        self.template = Template(eos=tokenizer.eos_token)
        self.max_length = max_length
        # What the tokenizer puts before a whole prompt at inference (BOS for LLaMA, nothing for SmolLM2) comes
        # first in training too, masked.
        self.prefix = list(tokenizer("").input_ids)

    def __call__(self, turns: list[tuple[str, str]]) -> Tokenized:
        """Raises ValueError for a conversation that cannot be trained on (the message says why)."""
        if len(turns) < 2:
            raise ValueError(f"{len(turns)} turn(s): a conversation needs at least a text turn and an answer")
        pieces = self.template.segments(turns)
        if not pieces[-1][1]:
            pieces = pieces[:-1]  # a final question without its answer teaches nothing
        input_ids, loss_mask = list(self.prefix), [0] * len(self.prefix)
        exchanges = [pieces[i : i + 2] for i in range(0, len(pieces), 2)]  # (prompt, answer) each
        for index, exchange in enumerate(exchanges):
            ids = [self.tokenizer(text, add_special_tokens=False).input_ids for text, _ in exchange]
            if len(input_ids) + sum(map(len, ids)) > self.max_length:
                if index == 0:
                    need = len(input_ids) + sum(map(len, ids))
                    raise TooLong(f"text and first answer take {need} tokens, more than --max-length {self.max_length}")
                return Tokenized(input_ids, loss_mask, turns_cut=len(exchanges) - index)
            for (_, is_answer), piece_ids in zip(exchange, ids):
                input_ids += piece_ids
                loss_mask += [int(is_answer)] * len(piece_ids)
        return Tokenized(input_ids, loss_mask, turns_cut=0)


def conversation_turns(conversation: Any) -> list[tuple[str, str]]:
    """(role, value) pairs of one `conversations` cell; ValueError for a malformed one."""
    if conversation is None or isinstance(conversation, (str, bytes)):
        raise ValueError("`conversations` is not a list of turns")
    turns = []
    for turn in conversation:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise ValueError("a turn is not {from, value} with string values")
        turns.append((turn["from"], turn["value"]))
    return turns


def tokenized_conversations(records: list[dict[str, Any]], tokenizer: Any, *, max_length: int) -> list[Tokenized]:
    """The records' `conversations` tokenized in order, without shuffling, leaving out those whose text and first
    answer exceed `max_length`; ValueError naming the first malformed one."""
    tokenize = ConversationTokenizer(tokenizer, max_length=max_length)
    kept = []
    for index, record in enumerate(records):
        try:
            kept.append(tokenize(conversation_turns(record.get("conversations"))))
        except TooLong:
            continue  # the others still show what the model sees
        except ValueError as error:
            raise ValueError(f"conversation {index} of the list is not a UniNER conversation ({error})") from None
    return kept


class TokenizeConversations:
    """Ray Data callable class: rows {id, conversations} in, TOKENS_SCHEMA rows out (rejects carry a reason)."""

    def __init__(self, *, model_dir: str, max_length: int, seed: int):
        from transformers import AutoTokenizer

        self.tokenize = ConversationTokenizer(AutoTokenizer.from_pretrained(model_dir), max_length=max_length)
        self.seed = seed

    def __call__(self, table: pa.Table) -> pa.Table:
        if "conversations" not in table.column_names:
            columns = ", ".join(table.column_names)
            raise UserError(
                f"the data has no `conversations` column (columns: {columns}): give Pile-NER train.json-shaped data"
            )
        ids = table["id"].to_pylist() if "id" in table.column_names else [None] * table.num_rows
        rows = []
        for conversation_id, conversation in zip(ids, table["conversations"].to_pylist()):
            if conversation_id is None:  # without an id, the content names the conversation (seeds its shuffle)
                conversation_id = hashlib.sha1(repr(conversation).encode()).hexdigest()[:20]
            conversation_id = str(conversation_id)
            try:
                turns = shuffled_turns(conversation_turns(conversation), conversation_rng(self.seed, conversation_id))
                tokens = self.tokenize(turns)
            except ValueError as error:
                reason = "too_long" if isinstance(error, TooLong) else "malformed"
                rows.append(
                    {
                        "id": conversation_id,
                        "input_ids": [],
                        "loss_mask": [],
                        "n_tokens": 0,
                        "n_label_tokens": 0,
                        "turns_cut": 0,
                        "reason": reason,
                        "detail": str(error),
                    }
                )
                continue
            rows.append(
                {
                    "id": conversation_id,
                    "input_ids": tokens.input_ids,
                    "loss_mask": tokens.loss_mask,
                    "n_tokens": len(tokens.input_ids),
                    "n_label_tokens": sum(tokens.loss_mask),
                    "turns_cut": tokens.turns_cut,
                    "reason": None,
                    "detail": None,
                }
            )
        return pa.Table.from_pylist(rows, schema=TOKENS_SCHEMA)


def length_grouped(
    rows: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_size: int, rng: random.Random
) -> Iterator[list]:
    """Micro-batches of `batch_size` conversations of similar length from one window of rows, in random order."""
    ordered = sorted(rows, key=lambda row: len(row[0]))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    yield from batches


def collate(
    batch: list[tuple[np.ndarray, np.ndarray]], *, pad_id: int, pad_to_multiple: int = 1
) -> dict[str, np.ndarray]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX outside the answers and on padding), as wide
    as the longest row rounded up to a multiple of `pad_to_multiple`."""
    longest = max(len(ids) for ids, _ in batch)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(batch), width), dtype=np.int64)
    labels = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, mask) in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = np.where(np.asarray(mask) > 0, ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def micro_batches(
    windows: Iterable[dict[str, np.ndarray]],
    *,
    batch_size: int,
    rng: random.Random,
    pad_id: int,
    pad_to_multiple: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Collated micro-batches from windows of rows (numpy batches with `input_ids` and `loss_mask` columns)."""
    for window in windows:
        rows = list(zip(window["input_ids"], window["loss_mask"]))
        for batch in length_grouped(rows, batch_size=batch_size, rng=rng):
            yield collate(batch, pad_id=pad_id, pad_to_multiple=pad_to_multiple)

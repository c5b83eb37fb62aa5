"""How far compact forms of a student lie from its full weights: the mean KL divergence of their next-token
distributions from the full weights', over every token and over answer tokens of UniNER conversations.

    python benchmarks/compact_divergence.py --full FULL_WEIGHTS --models uniner-ner-135m[,OTHER,...] \
        [--conversations ../shared/data/pile-ner-sample/pile_ner_type_sample.json] [--skip 200] [--count 40]

A dev-benchmark figure moves by about half a point between two models whose weights differ by fp16 rounding
(docs/results.md), so it cannot tell two compact forms apart; this divergence can, in a minute a model, and it
needs no dev data. Take conversations the calibration of `python -m uniner.delta export --calibration` did not see
(it reads the first 128): `--skip` them. Conversations longer than `--max-length` tokens are left out. Prints one
table and, last, `kl_answers: <figure>` for the last model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pile-ner-sample" / "pile_ner_type_sample.json"
)


def tokenized(path: Path, *, skip: int, count: int, tokenizer, max_length: int) -> list:
    """Token ids and loss masks of conversations skip .. skip+count of `path`, those that fit `max_length`."""
    from uniner.train_data import tokenized_conversations

    records = json.loads(path.read_text(encoding="utf-8"))[skip : skip + count]
    return tokenized_conversations(records, tokenizer, max_length=max_length)


def log_probs(spec: str, conversations: list) -> list:
    """The model's next-token log-probabilities at every position of each conversation (fp32, on CPU)."""
    import torch

    from uniner.models import load_causal_lm

    model, _ = load_causal_lm(spec)
    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([c.input_ids])).logits[0], dim=-1) for c in conversations]


def divergence(reference: list, candidate: list, conversations: list) -> tuple[float, float]:
    """Mean KL(reference || candidate) per position, over all positions and over those that predict answer tokens."""
    import torch

    total = answers = positions = answer_positions = 0.0
    for full, compact, conversation in zip(reference, candidate, conversations):
        kl = (full.exp() * (full - compact)).sum(dim=-1)
        predicts_answer = torch.tensor(conversation.loss_mask[1:] + [0], dtype=torch.bool)
        total += float(kl.sum())
        positions += kl.numel()
        answers += float(kl[predicts_answer].sum())
        answer_positions += int(predicts_answer.sum())
    return total / positions, answers / answer_positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", required=True, help="the full weights: a model spec (folder, built-in name)")
    parser.add_argument("--models", required=True, help="comma-separated model specs of its compact forms")
    parser.add_argument("--conversations", type=Path, default=SAMPLE, help="UniNER conversations (JSON list)")
    parser.add_argument("--skip", type=int, default=200, help="conversations to skip from the first (default 200)")
    parser.add_argument("--count", type=int, default=40, help="conversations to read after those (default 40)")
    parser.add_argument("--max-length", type=int, default=1024, help="longest conversation kept, in tokens")
    args = parser.parse_args()
    if not args.conversations.is_file():
        raise SystemExit(f"compact_divergence: {args.conversations} not found: give --conversations or ../shared/data")

    from uniner.models import load_tokenizer

    conversations = tokenized(
        args.conversations,
        skip=args.skip,
        count=args.count,
        tokenizer=load_tokenizer(args.full),
        max_length=args.max_length,
    )
    tokens = sum(len(c.input_ids) for c in conversations)
    print(f"{len(conversations)} conversations, {tokens} tokens; reference {args.full}")
    reference = log_probs(args.full, conversations)
    print("| model | KL, all tokens | KL, answer tokens |\n| --- | --- | --- |")
    for spec in [spec for spec in args.models.split(",") if spec]:
        every, answers = divergence(reference, log_probs(spec, conversations), conversations)
        print(f"| {spec} | {every:.4f} | {answers:.4f} |", flush=True)
    print(f"kl_answers: {answers:.4f}")


if __name__ == "__main__":
    main()

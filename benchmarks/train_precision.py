"""`uniner train`'s step in bf16 autocast against fp32 on the CPU, and what bf16 does to the loss.

    python benchmarks/train_precision.py [--rounds 2] [--steps 8] [--workdir /tmp/uniner-bench-precision]

The plain training loop of `train_throughput.py` (the worker's model loading, micro-batches, `train_step`,
optimizer and schedule, without Ray), in a fresh process per run, on the same micro-batches of the Pile-NER sample
and the built-in student, once in fp32 and once with `--precision bf16`; each round runs both, in alternating
order. CPUs with AMX or AVX512-BF16 run bf16 matrix products natively; others emulate them. Prints a table, then
`bf16_loss_gap: <mean |loss difference| over all steps>` and, last, `bf16_vs_fp32_speed: <ratio>` (fp32 seconds
per real token over bf16 seconds per real token, after the first `--skip` steps of each run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train_throughput import (
    SAMPLE,
    after_warmup,
    bench_config,
    conversations,
    per_token,
    plain_process,
    prepare_workdir,
)


def cpu_flags() -> str:
    """The bf16-related flags of this CPU, as Linux names them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in flags if f in ("amx_bf16", "avx512_bf16")) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of both sides, in alternating order.")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps of each side in each round.")
    parser.add_argument("--skip", type=int, default=2, help="First steps of each run left out (warm-up).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training process on both sides.")
    parser.add_argument("--workdir", default="/tmp/uniner-bench-precision")
    args = parser.parse_args()
    if args.rounds < 1 or not 0 <= args.skip < args.steps:
        parser.error("--rounds must be at least 1 and --skip below --steps: e.g. --rounds 2 --steps 8 --skip 2")
    if not SAMPLE.is_file():
        sys.exit(f"the Pile-NER sample is not at {SAMPLE}: place ../shared/data beside the project")

    work = Path(args.workdir)
    config = bench_config(args, work)
    windows = prepare_workdir(config, work)

    runs: dict[str, list] = {"fp32": [], "bf16": []}
    for index in range(args.rounds):
        for side in ("fp32", "bf16") if index % 2 == 0 else ("bf16", "fp32"):
            runs[side].append(plain_process(args, work, index, bf16=side == "bf16"))
    if len({tuple(step[1] for step in run) for run in runs["fp32"] + runs["bf16"]}) != 1:
        sys.exit("the runs did not train on the same batches, so they cannot be compared")
    fp32_rate = per_token(after_warmup(runs["fp32"], args.skip))
    bf16_rate = per_token(after_warmup(runs["bf16"], args.skip))
    gaps = [abs(a[2] - b[2]) for f, b16 in zip(runs["fp32"], runs["bf16"]) for a, b in zip(f, b16)]

    print(
        f"\n{conversations(windows)} trainable conversations of the Pile-NER sample, {config.model}, batch "
        f"{config.batch_size}, {args.threads} threads, CPU bf16 flags: {cpu_flags()}; {args.rounds} rounds of "
        f"{args.steps} steps a side (first {args.skip} of each left out of the times)"
    )
    print("| round | first | fp32 ms per real token | bf16 ms per real token | speed-up | fp32 losses | bf16 losses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for index, (fp32, bf16) in enumerate(zip(runs["fp32"], runs["bf16"])):
        a, b = per_token(fp32[args.skip :]), per_token(bf16[args.skip :])
        print(
            f"| {index + 1} | {'fp32' if index % 2 == 0 else 'bf16'} | {1000 * a:.2f} | {1000 * b:.2f} | {a / b:.2f} | "
            f"{' '.join(f'{step[2]:.3f}' for step in fp32)} | {' '.join(f'{step[2]:.3f}' for step in bf16)} |"
        )
    print(f"| pooled | | {1000 * fp32_rate:.2f} | {1000 * bf16_rate:.2f} | {fp32_rate / bf16_rate:.2f} | | |\n")
    print(f"bf16_loss_gap: {sum(gaps) / len(gaps):.4f}")
    print(f"bf16_vs_fp32_speed: {fp32_rate / bf16_rate:.2f}")


if __name__ == "__main__":
    main()

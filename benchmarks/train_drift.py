"""Whether a long CPU training run keeps its step speed: micro-batch widths as they come against widths rounded up
to a multiple (`--pad-to-multiple`).

    python benchmarks/train_drift.py [--steps 200] [--window 50] [--multiple 32] [--workdir /tmp/uniner-bench-drift]

Both sides run the plain training loop of `train_throughput.py` (the worker's model loading, micro-batches,
`train_step`, optimizer and schedule, without Ray) in bf16 autocast, each in a fresh process and, as under Ray Train,
in a thread other than the main one, with the environment `uniner train` gives its workers. They train on the same
micro-batches of the Pile-NER sample in the same order; only the widths differ (`--pad-to-multiple 1`: each batch
as wide as its longest conversation; `--multiple`: rounded up). The CPU kernels (oneDNN) build and cache code for
every new shape; a run of hundreds of distinct widths was seen to slow step by step and to get its speed back after
a restart. Prints real tokens per second over the first and the last `--window` steps of each side, and, last,
`rounded_vs_exact_late_speed: <ratio>` (real tokens per second over the last `--window` steps, rounded side over
exact side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

from train_throughput import SAMPLE, WINDOWS_FILE, bench_config, plain_loop, prepare_workdir


def run_side(args, work: Path, multiple: int) -> list[tuple[float, int, float]]:
    """The plain loop with widths rounded to `multiple`, in a fresh process: (seconds, real tokens, loss) per step."""
    from uniner.train import WORKER_RUNTIME_ENV

    out = work / f"side-{multiple}.json"
    command = [sys.executable, __file__, "--side", str(multiple), "--side-to", str(out), "--workdir", str(work)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **WORKER_RUNTIME_ENV["env_vars"]}
    subprocess.run(command, env=env, check=True)
    return [tuple(step) for step in json.loads(out.read_text())]


def side_process(args) -> None:
    """Child process: the plain loop in a thread, as Ray Train runs the training function."""
    work = Path(args.workdir)
    config = dataclasses.replace(bench_config(args, work), pad_to_multiple=args.side)
    windows = pickle.loads((work / WINDOWS_FILE).read_bytes())
    timed: list = []
    worker = threading.Thread(
        target=lambda: timed.extend(plain_loop(config, windows, threads=args.threads, bf16=True)), name="train"
    )
    worker.start()
    worker.join()
    Path(args.side_to).write_text(json.dumps(timed))


def rate(steps: list[tuple]) -> float:
    """Real tokens per second over the given steps."""
    return sum(step[1] for step in steps) / sum(step[0] for step in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Optimizer steps of each side.")
    parser.add_argument("--window", type=int, default=50, help="Steps at the start and at the end that are compared.")
    parser.add_argument("--multiple", type=int, default=32, help="The rounded side's --pad-to-multiple.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training process on both sides.")
    parser.add_argument("--workdir", default="/tmp/uniner-bench-drift")
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--side-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        return side_process(args)
    if not 2 <= 2 * args.window <= args.steps:
        parser.error("--steps must be at least twice --window: e.g. --steps 200 --window 50")
    if not SAMPLE.is_file():
        sys.exit(f"the Pile-NER sample is not at {SAMPLE}: place ../shared/data beside the project")

    work = Path(args.workdir)
    config = bench_config(args, work)
    prepare_workdir(config, work)
    sides = {multiple: run_side(args, work, multiple) for multiple in (1, args.multiple)}
    exact, rounded = sides[1], sides[args.multiple]
    if [step[1] for step in exact] != [step[1] for step in rounded]:
        sys.exit("the sides did not train on the same conversations, so they cannot be compared")

    first, last = slice(2, args.window), slice(-args.window, None)  # two warm-up steps left out
    print(
        f"\n{config.model}, bf16, batch {args.batch_size}, {args.threads} threads, {args.steps} steps a side on the "
        f"Pile-NER sample; real tokens per second"
    )
    print(f"| widths | steps 3-{args.window} | last {args.window} steps | last over first |")
    print("| --- | --- | --- | --- |")
    for name, steps in (("as they come", exact), (f"multiple of {args.multiple}", rounded)):
        start, end = rate(steps[first]), rate(steps[last])
        print(f"| {name} | {start:.0f} | {end:.0f} | {end / start:.2f} |")
    print(f"\nrounded_vs_exact_late_speed: {rate(rounded[last]) / rate(exact[last]):.2f}")


if __name__ == "__main__":
    main()

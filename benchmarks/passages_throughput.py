"""`uniner passages` on Ray Data against a plain single-process loop, same corpus, same tokenizer and chunking rule.

    python benchmarks/passages_throughput.py [--mb 60] [--workdir /tmp/uniner-bench]

Prints a table and, last, `passages_vs_single_process: <ratio>` (single-process seconds / stage seconds).
Both sides read the same generated corpus and write Parquet; the stage's time includes its actors' start-up,
the embedded Ray's own start is left out (a cluster is already up when a job runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq


def single_process(corpus: str, out: str, *, tokenizer_spec: str, max_tokens: int, min_tokens: int) -> int:
    """The same reading, chunking, dedup and ordering as the stage, in one plain loop."""
    from uniner import storage
    from uniner.chunking import Chunker
    from uniner.documents import Document, ReaderSettings, read_documents, relative_names
    from uniner.models import load_tokenizer
    from uniner.passages import dedup_key, passage_id, sample_key

    chunker = Chunker(load_tokenizer(tokenizer_spec), max_tokens)
    files = storage.list_files(storage.locate(corpus))
    seen, rows = set(), []
    for file, relative in zip(files, relative_names(files)):
        for item in read_documents(file, relative, ReaderSettings()):
            if not isinstance(item, Document):
                continue
            for span in chunker.spans(item.text):
                text = item.text[span.start : span.end]
                key = dedup_key(text)
                if span.n_tokens < min_tokens or key in seen:
                    continue
                seen.add(key)
                pid = passage_id(item.doc_id, span.start)
                rows.append(
                    {
                        "passage_id": pid,
                        "doc_id": item.doc_id,
                        "text": text,
                        "char_start": span.start,
                        "char_end": span.end,
                        "n_tokens": span.n_tokens,
                        "source": item.source,
                        "rank": sample_key(0, pid),
                    }
                )
    rows.sort(key=lambda row: row.pop("rank"))
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "passages.parquet"))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mb", type=float, default=60.0, help="Corpus size in MB (at least 20; the recorded figure is at 60)."
    )
    parser.add_argument("--workdir", default="/tmp/uniner-bench-passages")
    args = parser.parse_args()

    from uniner import passages
    from uniner.config import PassagesConfig
    from uniner.corpus import write_sample_corpus
    from uniner.models import resolve_model
    from uniner.session import cluster_cpus, init_ray

    shutil.rmtree(args.workdir, ignore_errors=True)
    corpus = os.path.join(args.workdir, "corpus")
    documents = int(args.mb * 1e6 / 1350)  # the generated documents average about 1,350 bytes
    write_sample_corpus(corpus, documents=documents, files=32, seed=0)
    size_mb = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus)) / 1e6
    resolve_model("smollm2-135m-instruct")
    init_ray()

    started = time.perf_counter()
    single_rows = single_process(
        corpus,
        os.path.join(args.workdir, "single"),
        tokenizer_spec="smollm2-135m-instruct",
        max_tokens=256,
        min_tokens=8,
    )
    single_s = time.perf_counter() - started

    started = time.perf_counter()
    summary = passages.run(PassagesConfig(input=corpus, output=os.path.join(args.workdir, "stage")))
    stage_s = time.perf_counter() - started
    assert summary["passages_written"] == single_rows, (summary["passages_written"], single_rows)

    print(f"\ncorpus: {size_mb:.1f} MB, {documents} documents in 32 files; Ray CPUs: {cluster_cpus()}")
    print(f"{'run':<28}{'seconds':>10}{'MB/s':>8}{'passages':>10}")
    print(f"{'single process':<28}{single_s:>10.1f}{size_mb / single_s:>8.2f}{single_rows:>10}")
    print(
        f"{'uniner passages (Ray Data)':<28}{stage_s:>10.1f}{size_mb / stage_s:>8.2f}{summary['passages_written']:>10}"
    )
    print(f"passages_vs_single_process: {single_s / stage_s:.2f}")


if __name__ == "__main__":
    main()

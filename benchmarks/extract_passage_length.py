"""What `uniner extract --passage-tokens` costs and gains: entity F1 on whole documents, cut into passages of several
lengths, with the built-in student (or --model).

    python benchmarks/extract_passage_length.py [--sets ai,music,politics] [--docs 20] [--sentences 8] \\
        [--lengths 64,128,256] [--model uniner-ner-135m]

Documents are --sentences consecutive sentences of a CrossNER dev set (the first --docs x --sentences of the file),
joined by spaces; the gold is every entity of the file's types (misc left out) at its character offsets. Each
length runs `uniner extract` over the same documents with the set's types and scores its entities against the gold:
strict span F1 (start, end and type must match), micro over the set. Queries are one per (passage, type), so shorter
passages cost more queries; the table shows both. Last line: `extract_f1_short_vs_default: <ratio>`, the mean F1
with the shortest length over the mean F1 with the stage's default. Needs ../shared/data beside the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's uniner, wherever the script is started from
SHARED = ROOT.parent / "shared" / "data"


def documents(name: str, docs: int, sentences: int) -> tuple[list[dict], set[tuple], list[str]]:
    """Documents of consecutive sentences of one CrossNER dev set, their gold (doc id, start, end, type), types."""
    from uniner.bio import read_bio

    bio = read_bio(str(SHARED / "crossner" / name / "dev.txt"))
    rows, gold = [], set()
    for index in range(docs):
        doc_id, parts, offset = f"{name}-{index}", [], 0
        for sentence in bio.sentences[index * sentences : (index + 1) * sentences]:
            gold |= {(doc_id, offset + e.start, offset + e.end, e.type) for e in sentence.entities}
            parts.append(sentence.text)
            offset += len(sentence.text) + 1
        rows.append({"id": doc_id, "text": " ".join(parts)})
    return rows, gold, bio.types


def extracted(config) -> tuple[set[tuple], dict]:
    """Run the stage; its entities as (doc id, start, end, type), and its summary."""
    import pyarrow.parquet as pq

    from uniner import extract

    summary = extract.run(config)
    table = pq.read_table(config.output, columns=["doc_id", "entities"]).to_pylist()
    found = {(row["doc_id"], e["start"], e["end"], e["type"]) for row in table for e in row["entities"] or []}
    return found, summary


def scores(found: set[tuple], gold: set[tuple]) -> dict[str, float]:
    right = len(found & gold)
    precision, recall = right / max(len(found), 1), right / max(len(gold), 1)
    return {"p": precision, "r": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-9)}


def main() -> None:
    from uniner.config import STUDENT_MODEL, ExtractConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="ai,music,politics", help="CrossNER domains")
    parser.add_argument("--docs", type=int, default=20, help="documents a set")
    parser.add_argument("--sentences", type=int, default=8, help="consecutive sentences a document")
    parser.add_argument("--lengths", default="64,128,256", help="--passage-tokens values, shortest first")
    parser.add_argument("--model", default=STUDENT_MODEL)
    parser.add_argument("--workdir", default="uniner-out/bench-passage-length")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: this benchmark reads CrossNER from ../shared/data")
    sets, lengths = args.sets.split(","), [int(n) for n in args.lengths.split(",")]
    default = ExtractConfig().passage_tokens
    if default not in lengths:
        sys.exit(f"--lengths must include the stage's default, {default}")
    workdir = Path(args.workdir)
    rows = []
    for name in sets:
        docs, gold, types = documents(name, args.docs, args.sentences)
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        for length in lengths:
            config = ExtractConfig(
                input=str(folder / "docs.jsonl"),
                output=str(folder / f"out-{length}"),
                types=types,
                model=args.model,
                id_field="id",
                passage_tokens=length,
                overwrite=True,
            )
            config.check()
            started = time.perf_counter()
            found, summary = extracted(config)
            seconds = time.perf_counter() - started
            rows.append(
                {"set": name, "length": length, "queries": summary["queries"], "s": seconds, **scores(found, gold)}
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.docs} documents of {args.sentences} sentences a set, model {args.model}\n")
    print("| set | passage tokens | queries | seconds | P | R | F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['set']} | {row['length']} | {row['queries']} | {row['s']:.0f} | {100 * row['p']:.1f} | "
            f"{100 * row['r']:.1f} | {100 * row['f1']:.1f} |"
        )
    mean = {n: sum(r["f1"] for r in rows if r["length"] == n) / len(sets) for n in lengths}
    print("| mean | " + ", ".join(f"{n}: {100 * mean[n]:.1f}" for n in lengths) + " | | | | | |")
    print(f"extract_f1_short_vs_default: {mean[lengths[0]] / max(mean[default], 1e-9):.2f}")


if __name__ == "__main__":
    main()

"""Stage 1, `uniner passages`: documents -> token-bounded passages, deduplicated and sampled, on Ray.

read + chunk (Ray Data over the files; actors hold the tokenizer and write one staging file per input file)
-> dedup (the driver sorts two 8-byte keys per candidate passage; the earliest of equal normalized texts is kept)
-> seeded sample (the smallest hashes of seed and passage id) -> one Ray task per staging file writes its passages
and rejects. Writes OUTPUT/*.parquet (the passages contract), OUTPUT/_rejects/ (every dropped item with its
reason) and OUTPUT/_summary.json, written last: its presence means the stage finished.

Only keys reach the driver: 16 bytes per candidate passage (160 MB for ten million), never documents or text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uniner import storage
from uniner.chunking import Chunker
from uniner.config import PassagesConfig, to_dict
from uniner.documents import (
    Document,
    ReaderSettings,
    detect_format,
    document_files,
    file_size,
    read_documents,
    relative_names,
)

log = logging.getLogger(__name__)

PASSAGE_COLUMNS = ["passage_id", "doc_id", "text", "char_start", "char_end", "n_tokens", "source"]
STAGING_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # passage | reject
        ("passage_id", pa.string()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("n_tokens", pa.int64()),
        ("source", pa.string()),
        ("dedup_key", pa.uint64()),
        ("sample_key", pa.uint64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
REJECT_COLUMNS = ["source", "doc_id", "passage_id", "char_start", "char_end", "reason", "detail", "text"]
REJECTS_DIR = "_rejects"
WORK_DIR = "_work"
ROWS_PER_GROUP = 2048


def passage_id(doc_id: str, char_start: int) -> str:
    """Stable id of a passage: a hash of its document id and start offset."""
    return hashlib.sha1(f"{doc_id}\x00{char_start}".encode()).hexdigest()[:20]


def dedup_key(text: str) -> int:
    """64-bit hash of the normalized text (NFKC, case-folded, whitespace collapsed): equal keys are duplicates."""
    normalized = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return int.from_bytes(hashlib.sha1(normalized.encode()).digest()[:8], "big")


def sample_key(seed: int, pid: str) -> int:
    """Seeded pseudo-random rank of a passage; the sample keeps the smallest, whatever the partitioning."""
    return int.from_bytes(hashlib.sha1(f"{seed}\x00{pid}".encode()).digest()[:8], "big")


class FilePassages:
    """Ray Data callable class: one input file per row in; it writes that file's staging table (passages and
    rejects, in input order) and returns one row of tallies."""

    def __init__(self, *, config: PassagesConfig, filesystem, staging: storage.Location):
        from uniner.models import load_tokenizer

        self.config = config
        self.filesystem = filesystem
        self.staging = staging
        self.settings = ReaderSettings(config.input_format, config.text_field, config.id_field)
        self.chunker = Chunker(
            load_tokenizer(config.tokenizer, s3_endpoint_url=config.s3_endpoint_url), config.max_tokens
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        tallies = [
            self._file(storage.Location(str(uri), self.filesystem, str(path)), str(relative), int(index))
            for uri, path, relative, index in zip(batch["uri"], batch["path"], batch["relative"], batch["index"])
        ]
        return {key: [t[key] for t in tallies] for key in tallies[0]}

    def _file(self, location: storage.Location, relative: str, file_index: int) -> dict[str, Any]:
        tally = {"index": file_index, "documents": 0, "candidates": 0, "forced_cuts": 0, "rejects": {}}
        target = self.staging.join(staging_name(file_index))
        rows: list[dict[str, Any]] = []
        with (
            self.staging.fs.open_output_stream(target.path) as stream,
            pq.ParquetWriter(stream, STAGING_SCHEMA) as writer,
        ):
            for item in read_documents(location, relative, self.settings):
                if isinstance(item, Document):
                    tally["documents"] += 1
                    rows.extend(self._passages(item, tally))
                else:
                    rows.append(
                        {
                            "kind": "reject",
                            "doc_id": item.doc_id,
                            "source": item.source,
                            "reason": item.reason,
                            "detail": item.detail,
                            "text": item.preview,
                        }
                    )
                    tally["rejects"][item.reason] = tally["rejects"].get(item.reason, 0) + 1
                if len(rows) >= ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA))
                    rows = []
            writer.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA))
        tally["rejects"] = json.dumps(tally["rejects"])  # one string column: reasons vary from file to file
        return tally

    def _passages(self, document: Document, tally: dict[str, Any]):
        for span in self.chunker.spans(document.text):
            text = document.text[span.start : span.end]
            pid = passage_id(document.doc_id, span.start)
            tally["forced_cuts"] += span.forced
            row = {
                "passage_id": pid,
                "doc_id": document.doc_id,
                "text": text,
                "char_start": span.start,
                "char_end": span.end,
                "n_tokens": span.n_tokens,
                "source": document.source,
            }
            if span.n_tokens < self.config.min_tokens:
                detail = f"{span.n_tokens} tokens, fewer than --min-tokens {self.config.min_tokens}"
                tally["rejects"]["too_short"] = tally["rejects"].get("too_short", 0) + 1
                yield {**row, "kind": "reject", "reason": "too_short", "detail": detail}
            else:
                tally["candidates"] += 1
                yield {
                    **row,
                    "kind": "passage",
                    "dedup_key": dedup_key(text),
                    "sample_key": sample_key(self.config.seed, pid),
                }


def staging_name(file_index: int) -> str:
    return f"{file_index:09d}.parquet"


def find_duplicates(files: list[storage.Location]) -> tuple[list[dict[int, str]], np.ndarray]:
    """Duplicates by normalized text over all staging files, the earliest in input order kept.

    Returns, per file, {row: passage id of the kept passage} for its duplicate rows, and the sample keys of the kept
    candidates. A stable sort of the 64-bit text keys puts equal texts together in input order.
    """
    rows, text_keys, sample_keys = [], [], []
    for file in files:
        table = pq.read_table(file.path, filesystem=file.fs, columns=["kind", "dedup_key", "sample_key"])
        is_candidate = pc.equal(table["kind"], "passage")
        rows.append(np.flatnonzero(is_candidate.to_numpy(zero_copy_only=False)))
        # Filtered first: a column with nulls would convert to float64 and lose the keys' low bits.
        candidates = table.filter(is_candidate)
        text_keys.append(candidates["dedup_key"].to_numpy())
        sample_keys.append(candidates["sample_key"].to_numpy())
    counts = [len(r) for r in rows]
    file_of = np.repeat(np.arange(len(files)), counts)
    row_of = np.concatenate(rows) if rows else np.array([], np.int64)
    keys = np.concatenate(text_keys) if text_keys else np.array([], np.uint64)
    order = np.argsort(keys, kind="stable")
    first = np.ones(len(order), bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    keeper_in_order = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    duplicates = order[~first]
    keepers = keeper_in_order[~first]
    keeper_ids = _passage_ids(files, file_of[np.unique(keepers)], row_of[np.unique(keepers)])
    per_file: list[dict[int, str]] = [{} for _ in files]
    for duplicate, keeper in zip(duplicates, keepers):
        per_file[file_of[duplicate]][int(row_of[duplicate])] = keeper_ids[(int(file_of[keeper]), int(row_of[keeper]))]
    kept = np.ones(len(keys), bool)
    kept[duplicates] = False
    return per_file, (np.concatenate(sample_keys) if sample_keys else np.array([], np.uint64))[kept]


def _passage_ids(
    files: list[storage.Location], file_indexes: np.ndarray, row_indexes: np.ndarray
) -> dict[tuple[int, int], str]:
    ids: dict[tuple[int, int], str] = {}
    for file_index in np.unique(file_indexes):
        wanted = row_indexes[file_indexes == file_index]
        column = pq.read_table(files[file_index].path, filesystem=files[file_index].fs, columns=["passage_id"])[
            "passage_id"
        ]
        ids.update({(int(file_index), int(r)): pid for r, pid in zip(wanted, column.take(wanted).to_pylist())})
    return ids


def sample_threshold(sample_keys: np.ndarray, n: int) -> int | None:
    """The n-th smallest sample key of the kept passages (None when there are n or fewer: all are kept)."""
    if not n or len(sample_keys) <= n:
        return None
    return int(np.partition(sample_keys, n - 1)[n - 1])


def finalize(
    staging: storage.Location, output: storage.Location, name: str, duplicate_of: dict[int, str], threshold: int | None
) -> int:
    """Write one staging file's passages (those kept and sampled) and rejects (its own and its duplicates)."""
    table = pq.read_table(staging.path, filesystem=staging.fs)
    is_passage = pc.equal(table["kind"], "passage").to_numpy(zero_copy_only=False)
    duplicate = np.zeros(table.num_rows, bool)
    duplicate[list(duplicate_of)] = True
    sampled = np.ones(table.num_rows, bool)
    if threshold is not None:
        sampled = pc.fill_null(pc.less_equal(table["sample_key"], pa.scalar(threshold, pa.uint64())), False).to_numpy(
            zero_copy_only=False
        )
    passages = table.filter(is_passage & ~duplicate & sampled).select(PASSAGE_COLUMNS)
    rejects = table.filter(~is_passage | duplicate)
    if duplicate_of:
        rows = np.flatnonzero(~is_passage | duplicate)
        rejects = rejects.set_column(
            rejects.schema.get_field_index("reason"),
            "reason",
            pa.array(
                [
                    "duplicate" if r in duplicate_of else reason
                    for r, reason in zip(rows, rejects["reason"].to_pylist())
                ],
                pa.string(),
            ),
        )
        rejects = rejects.set_column(
            rejects.schema.get_field_index("detail"),
            "detail",
            pa.array(
                [
                    f"same text as passage {duplicate_of[r]}" if r in duplicate_of else detail
                    for r, detail in zip(rows, rejects["detail"].to_pylist())
                ],
                pa.string(),
            ),
        )
    if passages.num_rows:
        pq.write_table(passages, output.join(name).path, filesystem=output.fs)
    if rejects.num_rows:
        pq.write_table(rejects.select(REJECT_COLUMNS), output.join(REJECTS_DIR, name).path, filesystem=output.fs)
    return passages.num_rows


def plan(config: PassagesConfig) -> list[str]:
    """What the stage would do, for --dry-run."""
    files = document_files(config.input, input_format=config.input_format, s3_endpoint_url=config.s3_endpoint_url)
    formats: dict[str, int] = {}
    for file in files:
        fmt, compression = detect_format(file.path, config.input_format)
        name = f"{fmt}+{compression}" if fmt and compression else fmt or "unsupported (will be rejected)"
        formats[name] = formats.get(name, 0) + 1
    total_mb = sum(file_size(f) for f in files) / 1e6
    sample = f"sample {config.sample_size} passages (seed {config.seed})" if config.sample_size else "keep all passages"
    return [
        f"read {len(files)} files ({total_mb:.1f} MB): "
        + ", ".join(f"{n} {name}" for name, n in sorted(formats.items())),
        f"chunk to at most {config.max_tokens} tokens of {config.tokenizer}, "
        f"drop passages under {config.min_tokens} tokens",
        ("deduplicate by normalized text, then " if config.dedup else "no deduplication, then ") + sample,
        f"write passages to {config.output} (Parquet), rejects to {config.output}/{REJECTS_DIR}, "
        f"summary to {config.output}/{storage.SUMMARY_FILE}",
    ]


def run(config: PassagesConfig) -> dict[str, Any]:
    """Run the stage; returns the summary that is also written to OUTPUT/_summary.json."""
    import ray

    from uniner.models import resolve_model
    from uniner.session import cluster_cpus, init_ray

    started = time.time()
    output = config.locate(config.output)
    files = document_files(config.input, input_format=config.input_format, s3_endpoint_url=config.s3_endpoint_url)
    resolve_model(config.tokenizer, s3_endpoint_url=config.s3_endpoint_url)  # fetch once here, not in every actor
    storage.prepare_output(output, overwrite=config.overwrite)
    init_ray()
    workers = max(1, min(config.num_workers or cluster_cpus(), len(files)))
    log.info("passages: %d files -> %s with %d reader actors", len(files), output, workers)

    items = [
        {"uri": f.uri, "path": f.path, "relative": rel, "index": i}
        for i, (f, rel) in enumerate(zip(files, relative_names(files)))
    ]
    staging = output.join(WORK_DIR, "staging")
    with storage.storage_errors("write", staging):
        staging.fs.create_dir(staging.path, recursive=True)
        # The actors write their own staging files, so nothing downstream needs a CPU: a fixed pool of `workers`
        # actors cannot starve later tasks.
        tallies = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                FilePassages,
                fn_constructor_kwargs={"config": config, "filesystem": files[0].fs, "staging": staging},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=1,
            )
            .take_all()
        )
    counts = _counts(tallies)
    staged = [staging.join(staging_name(i)) for i in range(len(files))]
    if config.dedup:
        log.info("passages: deduplicating %d candidate passages", counts["candidates"])
        duplicate_of, sample_keys = find_duplicates(staged)
    else:
        duplicate_of = [{} for _ in staged]
        sample_keys = np.concatenate(
            [
                pq.read_table(f.path, filesystem=f.fs, columns=["sample_key"], filters=[("kind", "=", "passage")])[
                    "sample_key"
                ].to_numpy()
                for f in staged
            ]
            or [np.array([], np.uint64)]
        )
    threshold = sample_threshold(sample_keys, config.sample_size)
    log.info("passages: writing passages and rejects")
    write = ray.remote(num_cpus=1)(finalize)
    with storage.storage_errors("write", output):
        output.fs.create_dir(output.join(REJECTS_DIR).path, recursive=True)
        written = sum(
            ray.get(
                [
                    write.remote(file, output, f"part-{i:09d}.parquet", duplicates, threshold)
                    for i, (file, duplicates) in enumerate(zip(staged, duplicate_of))
                ]
            )
        )
    counts["dropped"]["duplicate"] = sum(len(d) for d in duplicate_of)
    unique = counts["candidates"] - counts["dropped"]["duplicate"]
    summary = {
        "stage": "passages",
        "input": config.input,
        "output": config.output,
        "files": len(files),
        "documents_read": counts["documents"],
        "passages_written": written,
        "records_written": written,
        "candidate_passages": counts["candidates"],
        "not_sampled": unique - written,
        "dropped": {reason: n for reason, n in sorted(counts["dropped"].items()) if n},
        "forced_cuts": counts["forced_cuts"],
        "seconds": round(time.time() - started, 1),
        "config": to_dict(config),
    }
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    storage.delete_tree(output.join(WORK_DIR))
    return summary


def _counts(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {"documents": 0, "candidates": 0, "forced_cuts": 0, "dropped": {}}
    for tally in tallies:
        for key in ("documents", "candidates", "forced_cuts"):
            counts[key] += int(tally[key])
        for reason, n in json.loads(tally["rejects"]).items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + int(n)
    return counts


def summary_lines(summary: dict[str, Any]) -> list[str]:
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items()) or "none"
    return [
        f"files read:        {summary['files']}",
        f"documents read:    {summary['documents_read']}",
        f"passages written:  {summary['passages_written']} (of {summary['candidate_passages']} candidates; "
        f"{summary['not_sampled']} not sampled)",
        f"dropped by reason: {dropped}",
        f"forced cuts inside over-long words: {summary['forced_cuts']}",
        f"took {summary['seconds']} s; rejects in {summary['output']}/{REJECTS_DIR}, "
        f"summary in {summary['output']}/{storage.SUMMARY_FILE}",
    ]

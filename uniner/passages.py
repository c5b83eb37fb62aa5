"""Stage 1, `uniner passages`: documents -> token-bounded passages, deduplicated and sampled, on Ray Data.

read + chunk (actors holding the tokenizer, one file at a time) -> staging table -> dedup (group by normalized-text
hash, the earliest passage kept) -> seeded sample (the smallest hashes of seed and passage id) -> Parquet.
Writes OUTPUT/*.parquet (the passages contract), OUTPUT/_rejects/ (every dropped item with its reason) and
OUTPUT/_summary.json, written last: its presence means the stage finished.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from uniner import storage
from uniner.chunking import Chunker
from uniner.config import PassagesConfig, to_dict
from uniner.documents import Document, ReaderSettings, detect_format, file_size, read_documents, relative_names

log = logging.getLogger(__name__)

PASSAGE_COLUMNS = ["passage_id", "doc_id", "text", "char_start", "char_end", "n_tokens", "source"]
STAGING_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # passage | reject | file
        ("passage_id", pa.string()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("n_tokens", pa.int64()),
        ("source", pa.string()),
        ("order_key", pa.string()),  # input order, ending in the passage id: the smallest of duplicates is kept
        ("dedup_key", pa.string()),
        ("sample_key", pa.uint64()),
        ("forced_cut", pa.bool_()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("documents", pa.int64()),  # on `file` rows: documents read from that file
    ]
)
REJECT_COLUMNS = ["source", "doc_id", "passage_id", "char_start", "char_end", "reason", "detail", "text"]
SUMMARY_FILE = "_summary.json"
REJECTS_DIR = "_rejects"
WORK_DIR = "_work"
ROWS_PER_TABLE = 2048


def passage_id(doc_id: str, char_start: int) -> str:
    """Stable id of a passage: a hash of its document id and start offset."""
    return hashlib.sha1(f"{doc_id}\x00{char_start}".encode()).hexdigest()[:20]


def dedup_key(text: str) -> str:
    """Hash of the normalized text (NFKC, case-folded, whitespace collapsed): equal keys are duplicates."""
    normalized = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha1(normalized.encode()).hexdigest()[:20]


def sample_key(seed: int, pid: str) -> int:
    """Seeded pseudo-random rank of a passage; the sample keeps the smallest, whatever the partitioning."""
    return int.from_bytes(hashlib.sha1(f"{seed}\x00{pid}".encode()).digest()[:8], "big")


class FilePassages:
    """Ray Data callable class: file rows in, staging rows out (passages, rejects and one `file` row per file)."""

    def __init__(self, *, config: PassagesConfig, filesystem):
        from uniner.models import load_tokenizer

        self.config = config
        self.filesystem = filesystem
        self.settings = ReaderSettings(config.input_format, config.text_field, config.id_field)
        self.chunker = Chunker(load_tokenizer(config.tokenizer, s3_endpoint_url=config.s3_endpoint_url), config.max_tokens)

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for uri, path, relative, index in zip(batch["uri"], batch["path"], batch["relative"], batch["index"]):
            yield from self._file(storage.Location(str(uri), self.filesystem, str(path)), str(relative), int(index))

    def _file(self, location: storage.Location, relative: str, file_index: int) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        documents = 0
        for record_index, item in enumerate(read_documents(location, relative, self.settings)):
            if isinstance(item, Document):
                documents += 1
                rows.extend(self._passages(item, f"{file_index:09d}:{record_index:012d}"))
            else:
                text = item.preview
                rows.append({"kind": "reject", "doc_id": item.doc_id, "source": item.source, "reason": item.reason, "detail": item.detail, "text": text})
            if len(rows) >= ROWS_PER_TABLE:
                yield pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)
                rows = []
        rows.append({"kind": "file", "source": location.uri, "documents": documents})
        yield pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)

    def _passages(self, document: Document, order: str) -> Iterator[dict[str, Any]]:
        for span in self.chunker.spans(document.text):
            text = document.text[span.start : span.end]
            pid = passage_id(document.doc_id, span.start)
            row = {
                "passage_id": pid,
                "doc_id": document.doc_id,
                "text": text,
                "char_start": span.start,
                "char_end": span.end,
                "n_tokens": span.n_tokens,
                "source": document.source,
                "forced_cut": span.forced,
            }
            if span.n_tokens < self.config.min_tokens:
                detail = f"{span.n_tokens} tokens, fewer than --min-tokens {self.config.min_tokens}"
                yield {**row, "kind": "reject", "reason": "too_short", "detail": detail}
            else:
                yield {
                    **row,
                    "kind": "passage",
                    "order_key": f"{order}:{span.start:012d}:{pid}",
                    "dedup_key": dedup_key(text),
                    "sample_key": sample_key(self.config.seed, pid),
                }


def duplicate_groups(candidates, partitions: int) -> pa.Table:
    """The dedup keys that occur more than once, each with the order key of its earliest passage (the keeper).

    A vectorized hash aggregation; only repeated keys come back to the driver.
    """
    import ray
    from ray.data.aggregate import Count, Min

    grouped = candidates.select_columns(["dedup_key", "order_key"]).groupby("dedup_key", num_partitions=partitions)
    counted = grouped.aggregate(Count(alias_name="n"), Min("order_key", alias_name="keeper"))
    repeated = counted.map_batches(lambda t: t.filter(pc.greater(t["n"], 1)), batch_format="pyarrow", batch_size=None)
    tables = ray.get(repeated.to_arrow_refs())
    if not tables:
        return pa.table({"dedup_key": pa.array([], pa.string()), "keeper": pa.array([], pa.string())})
    return pa.concat_tables(tables).select(["dedup_key", "keeper"])


class MarkDuplicates:
    """Adds `duplicate_of` (the keeper's passage id, or null) to candidate passages, given the repeated keys."""

    def __init__(self, groups: pa.Table):
        self.repeated = groups["dedup_key"]
        self.keepers = dict(zip(groups["dedup_key"].to_pylist(), groups["keeper"].to_pylist()))

    def __call__(self, table: pa.Table) -> pa.Table:
        duplicate_of: list[str | None] = [None] * table.num_rows
        keys, orders = table["dedup_key"], table["order_key"]
        for index in np.flatnonzero(pc.is_in(keys, value_set=self.repeated).to_numpy(zero_copy_only=False)):
            keeper = self.keepers[keys[index].as_py()]
            if keeper != orders[index].as_py():
                duplicate_of[index] = keeper.rsplit(":", 1)[1]
        return table.append_column("duplicate_of", pa.array(duplicate_of, pa.string()))


def smallest_keys(table: pa.Table, n: int) -> pa.Table:
    """The n smallest sample keys of one block."""
    keys = table["sample_key"].to_numpy()
    if len(keys) > n:
        keys = np.partition(keys, n - 1)[:n]
    return pa.table({"sample_key": pa.array(keys, pa.uint64())})


def sample_threshold(kept, n: int) -> int | None:
    """The n-th smallest sample key over all kept passages (None when there are fewer than n)."""
    import ray

    block_keys = kept.map_batches(smallest_keys, fn_kwargs={"n": n}, batch_format="pyarrow", batch_size=None)
    tables = ray.get(block_keys.to_arrow_refs())
    keys = np.concatenate([t["sample_key"].to_numpy() for t in tables] or [np.array([], np.uint64)])
    if len(keys) < n:
        return None
    return int(np.partition(keys, n - 1)[n - 1])


def _where(column: str, value: Any):
    def select(table: pa.Table) -> pa.Table:
        return table.filter(pc.equal(table[column], value))

    return select


def _is_null(column: str, null: bool):
    def select(table: pa.Table) -> pa.Table:
        mask = pc.is_null(table[column])
        return table.filter(mask if null else pc.invert(mask))

    return select


def _as_rejects(table: pa.Table) -> pa.Table:
    if "duplicate_of" in table.column_names:
        n = table.num_rows
        table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(["duplicate"] * n, pa.string()))
        detail = pc.binary_join_element_wise(pa.array(["same text as passage "] * n), table["duplicate_of"], "")
        table = table.set_column(table.schema.get_field_index("detail"), "detail", detail)
    return table.select(REJECT_COLUMNS)


def list_inputs(config: PassagesConfig) -> list[storage.Location]:
    return storage.list_files(storage.locate(config.input, s3_endpoint_url=config.s3_endpoint_url))


def plan(config: PassagesConfig) -> list[str]:
    """What the stage would do, for --dry-run."""
    files = list_inputs(config)
    formats: dict[str, int] = {}
    for file in files:
        fmt, compression = detect_format(file.path, config.input_format)
        name = f"{fmt}+{compression}" if fmt and compression else fmt or "unsupported (will be rejected)"
        formats[name] = formats.get(name, 0) + 1
    total_mb = sum(file_size(f) for f in files) / 1e6
    sample = f"sample {config.sample_size} passages (seed {config.seed})" if config.sample_size else "keep all passages"
    return [
        f"read {len(files)} files ({total_mb:.1f} MB): " + ", ".join(f"{n} {name}" for name, n in sorted(formats.items())),
        f"chunk to at most {config.max_tokens} tokens of {config.tokenizer}, drop passages under {config.min_tokens} tokens",
        ("deduplicate by normalized text, then " if config.dedup else "no deduplication, then ") + sample,
        f"write passages to {config.output} (Parquet), rejects to {config.output}/{REJECTS_DIR}, summary to {config.output}/{SUMMARY_FILE}",
    ]


def run(config: PassagesConfig) -> dict[str, Any]:
    """Run the stage; returns the summary that is also written to OUTPUT/_summary.json."""
    import ray

    from uniner.models import resolve_model
    from uniner.session import cluster_cpus, init_ray

    started = time.time()
    output = storage.locate(config.output, s3_endpoint_url=config.s3_endpoint_url)
    resolve_model(config.tokenizer, s3_endpoint_url=config.s3_endpoint_url)  # fetch once here, not in every actor
    files = list_inputs(config)
    storage.prepare_output(output, overwrite=config.overwrite)
    init_ray()
    workers = config.num_workers or cluster_cpus()
    workers = max(1, min(workers, len(files)))
    log.info("passages: %d files -> %s with %d reader actors", len(files), output, workers)

    items = [
        {"uri": f.uri, "path": f.path, "relative": rel, "index": i}
        for i, (f, rel) in enumerate(zip(files, relative_names(files)))
    ]
    work = output.join(WORK_DIR)
    staging = work.join("staging")
    with storage.storage_errors("write", staging):
        (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                FilePassages,
                fn_constructor_kwargs={"config": config, "filesystem": files[0].fs},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                num_cpus=1,
            )
            .write_parquet(staging.path, filesystem=staging.fs)
        )
    staged = ray.data.read_parquet(staging.path, filesystem=staging.fs, schema=STAGING_SCHEMA)
    counts = _counts(staged)

    candidates = staged.map_batches(_where("kind", "passage"), batch_format="pyarrow", batch_size=None)
    rejects = staged.map_batches(_where("kind", "reject"), batch_format="pyarrow", batch_size=None).map_batches(_as_rejects, batch_format="pyarrow", batch_size=None)
    if config.dedup:
        log.info("passages: deduplicating %d candidate passages", counts["candidates"])
        groups = duplicate_groups(candidates, partitions=workers)
        marked = candidates.map_batches(MarkDuplicates(groups), batch_format="pyarrow", batch_size=None)
        kept = marked.map_batches(_is_null("duplicate_of", True), batch_format="pyarrow", batch_size=None)
        duplicates = marked.map_batches(_is_null("duplicate_of", False), batch_format="pyarrow", batch_size=None)
        rejects = rejects.union(duplicates.map_batches(_as_rejects, batch_format="pyarrow", batch_size=None))
    else:
        kept = candidates
    if config.sample_size:
        threshold = sample_threshold(kept, config.sample_size)
        if threshold is not None:
            kept = kept.map_batches(lambda t: t.filter(pc.less_equal(t["sample_key"], pa.scalar(threshold, pa.uint64()))), batch_format="pyarrow", batch_size=None)
    log.info("passages: writing passages and rejects")
    with storage.storage_errors("write", output):
        kept.select_columns(PASSAGE_COLUMNS).write_parquet(output.path, filesystem=output.fs)
        rejects.write_parquet(output.join(REJECTS_DIR).path, filesystem=output.fs)
    counts["dropped"]["duplicate"] = _count_rows(output.join(REJECTS_DIR), reason="duplicate")

    unique = counts["candidates"] - counts["dropped"].get("duplicate", 0)
    written = min(unique, config.sample_size) if config.sample_size else unique
    summary = {
        "stage": "passages",
        "input": config.input,
        "output": config.output,
        "files": len(files),
        "documents_read": counts["documents"],
        "passages_written": written,
        "candidate_passages": counts["candidates"],
        "not_sampled": unique - written,
        "dropped": {reason: n for reason, n in sorted(counts["dropped"].items()) if n},
        "forced_cuts": counts["forced_cuts"],
        "seconds": round(time.time() - started, 1),
        "config": to_dict(config),
    }
    storage.write_json(output.join(SUMMARY_FILE), summary)
    storage.delete_tree(work)
    return summary


def _count_rows(location: storage.Location, *, reason: str) -> int:
    """Rows of a written Parquet folder with the given reason (read with pyarrow: a small column)."""
    if not storage.exists(location):
        return 0
    dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
    return dataset.count_rows(filter=pc.field("reason") == reason)


def _count_batch(table: pa.Table) -> pa.Table:
    """Per-batch tallies of the staging rows: (kind, reason) -> rows, documents, forced cuts."""
    tallies: dict[tuple[str, str], list[int]] = {}
    for kind, reason, documents, forced in zip(*(table[c].to_pylist() for c in ("kind", "reason", "documents", "forced_cut"))):
        tally = tallies.setdefault((kind, reason or ""), [0, 0, 0])
        tally[0] += 1
        tally[1] += documents or 0
        tally[2] += 1 if forced else 0
    keys = list(tallies)
    return pa.table({
        "kind": [k for k, _ in keys], "reason": [r for _, r in keys],
        "rows": [tallies[k][0] for k in keys], "documents": [tallies[k][1] for k in keys], "forced": [tallies[k][2] for k in keys],
    })


def _counts(staged) -> dict[str, Any]:
    """One pass over the staging table: documents read, candidate passages, rejects by reason, forced cuts."""
    counts: dict[str, Any] = {"documents": 0, "candidates": 0, "forced_cuts": 0, "dropped": {}}
    columns = ["kind", "reason", "documents", "forced_cut"]
    for row in staged.select_columns(columns).map_batches(_count_batch, batch_format="pyarrow", batch_size=None).take_all():
        counts["documents"] += row["documents"]
        counts["forced_cuts"] += row["forced"]
        if row["kind"] == "passage":
            counts["candidates"] += row["rows"]
        elif row["kind"] == "reject":
            counts["dropped"][row["reason"]] = counts["dropped"].get(row["reason"], 0) + row["rows"]
    return counts


def summary_lines(summary: dict[str, Any]) -> list[str]:
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items()) or "none"
    return [
        f"files read:        {summary['files']}",
        f"documents read:    {summary['documents_read']}",
        f"passages written:  {summary['passages_written']} (of {summary['candidate_passages']} candidates; {summary['not_sampled']} not sampled)",
        f"dropped by reason: {dropped}",
        f"forced cuts inside over-long words: {summary['forced_cuts']}",
        f"took {summary['seconds']} s; rejects in {summary['output']}/{REJECTS_DIR}, summary in {summary['output']}/{SUMMARY_FILE}",
    ]

"""Stage 5, `uniner extract`: any entity types over a document lake, one query per (passage, type), on Ray Data.

read + split (tasks holding the model's tokenizer, one file at a time) -> one query per (passage, type), the
passage first so that vLLM's prefix cache serves every type of a passage -> engine actors (vLLM, or transformers
where vLLM is missing) -> staging table, with progress -> group by document: answers parsed, strings mapped to
document offsets, overlaps merged -> OUTPUT (Parquet or JSONL, one row per document) -> optional exports.
OUTPUT/_summary.json is written last: its presence means the stage finished.

The engine actors live in uniner/engine.py, shared with the evaluate stage.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from uniner import spans, storage
from uniner.config import ExtractConfig, to_dict
from uniner.documents import Document, ReaderSettings, document_files, read_documents, relative_names
from uniner.engine import engine_stage, pick_backend, template_for
from uniner.errors import UserError
from uniner.formats import parse_answer_lenient
from uniner.models import short_name

log = logging.getLogger(__name__)

STAGING_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # document | query | reject
        ("doc_key", pa.string()),  # file and record index: unique even where --id-field values repeat
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),  # the document, on its `document` row only
        ("char_start", pa.int64()),  # the passage a query asks about
        ("char_end", pa.int64()),
        ("type", pa.string()),
        ("prompt", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
ANSWERED_SCHEMA = STAGING_SCHEMA.append(pa.field("generated", pa.string()))
ENTITY = pa.struct([("text", pa.string()), ("type", pa.string()), ("start", pa.int64()), ("end", pa.int64())])
UNMATCHED = pa.struct([("text", pa.string()), ("type", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),  # ok, or why the document could not be read (the passages reject reasons)
        ("detail", pa.string()),
        ("text", pa.string()),
        ("entities", pa.list_(ENTITY)),
        ("unmatched", pa.list_(UNMATCHED)),  # answers found nowhere in the passage they were asked about
        ("queries", pa.int64()),
    ]
)
EXPORT_DIR = "_export"
HTML_DOCUMENTS = 200  # documents on the HTML page (those with entities first); its counts cover every document
WORK_DIR = "_work"
PROGRESS_EVERY_S = 10.0
STAGING_ROWS = 20_000  # rows per staging file


# ---- reading documents into queries ----


@functools.lru_cache(maxsize=2)
def _splitter(model_dir: str, passage_tokens: int):
    """The chunker and template of a model, once per worker process."""
    from transformers import AutoTokenizer

    from uniner.chunking import Chunker

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Chunker(tokenizer, passage_tokens), template_for(tokenizer)


def file_queries(
    batch: dict[str, Any], *, config: ExtractConfig, model_dir: str, types: list[str], filesystem
) -> Iterator[pa.Table]:
    """Ray Data task: file rows in; per document one `document` row and one `query` row per (passage, type) out;
    a `reject` row for every item that is not a readable document."""
    chunker, template = _splitter(model_dir, config.passage_tokens)
    settings = ReaderSettings(config.input_format, config.text_field, config.id_field)
    for uri, path, relative, index in zip(batch["uri"], batch["path"], batch["relative"], batch["index"]):
        location = storage.Location(str(uri), filesystem, str(path))
        rows: list[dict[str, Any]] = []
        for record, item in enumerate(read_documents(location, str(relative), settings)):
            key = f"{int(index):09d}:{record:012d}"
            if not isinstance(item, Document):
                rows.append(
                    {
                        "kind": "reject",
                        "doc_key": key,
                        "doc_id": item.doc_id,
                        "source": item.source,
                        "reason": item.reason,
                        "detail": item.detail,
                    }
                )
                continue
            base = {"doc_key": key, "doc_id": item.doc_id, "source": item.source}
            rows.append({**base, "kind": "document", "text": item.text})
            for span in chunker.spans(item.text):
                passage = item.text[span.start : span.end]
                for entity_type in types:
                    prompt = template.query(passage, entity_type)
                    rows.append(
                        {
                            **base,
                            "kind": "query",
                            "char_start": span.start,
                            "char_end": span.end,
                            "type": entity_type,
                            "prompt": prompt,
                        }
                    )
            if len(rows) >= 4096:
                yield pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)
                rows = []
        yield pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)


# ---- answers -> one row per document ----


def document_row(rows: list[dict[str, Any]], *, case_sensitive: bool, whole_words: bool) -> dict[str, Any]:
    """The staging rows of one document (its text, its answered queries, or its reject) -> its output row."""
    head = next((r for r in rows if r["kind"] in ("document", "reject")), rows[0])
    if head["kind"] == "reject":
        return {
            "doc_id": head["doc_id"],
            "source": head["source"],
            "status": head["reason"],
            "detail": head["detail"],
            "text": None,
            "entities": [],
            "unmatched": [],
            "queries": 0,
        }
    text = head["text"]
    found, unmatched = [], []
    queries = [r for r in rows if r["kind"] == "query"]
    for query in queries:
        answers = [(answer, query["type"]) for answer in parse_answer_lenient(query["generated"] or "")]
        entities, missing = spans.locate(
            text,
            answers,
            case_sensitive=case_sensitive,
            whole_words=whole_words,
            start=query["char_start"],
            end=query["char_end"],
        )
        found.extend(entities)
        unmatched.extend(missing)
    return {
        "doc_id": head["doc_id"],
        "source": head["source"],
        "status": "ok",
        "detail": "",
        "text": text,
        "entities": spans.merge(found),
        "unmatched": spans.merge_unmatched(unmatched),
        "queries": len(queries),
    }


def assemble_documents(group: pa.Table, *, case_sensitive: bool, whole_words: bool) -> pa.Table:
    """Ray Data group function: all staging rows of one document -> its output row."""
    row = document_row(group.to_pylist(), case_sensitive=case_sensitive, whole_words=whole_words)
    return pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA)


# ---- the stage ----


def entity_types(config: ExtractConfig) -> list[str]:
    """--types as given, or read from @FILE (one type per line; blank lines and `#` comments left out)."""
    if len(config.types) == 1 and config.types[0].startswith("@"):
        location = config.locate(config.types[0][1:])
        if not storage.exists(location):
            raise UserError(f"types file {location} does not exist: check the path after @")
        lines = [line.strip() for line in storage.read_text(location).splitlines()]
        types = [line for line in lines if line and not line.startswith("#")]
    else:
        types = list(config.types)
    if not types:
        raise UserError(f"{config.types[0][1:]} holds no entity types: write one type per line")
    return list(dict.fromkeys(types))


def plan(config: ExtractConfig) -> list[str]:
    """What the stage would do, for --dry-run."""
    files = document_files(config.input, input_format=config.input_format, s3_endpoint_url=config.s3_endpoint_url)
    types = entity_types(config)
    exports = f"; exports to {config.output}/{EXPORT_DIR}: {', '.join(config.export)}" if config.export else ""
    return [
        f"read {len(files)} files; split documents into passages of at most {config.passage_tokens} tokens "
        f"of {config.model}",
        f"ask {len(types)} types per passage ({', '.join(types[:8])}{', ...' if len(types) > 8 else ''})",
        f"engine: {pick_backend(config.backend)}, {config.replicas} replica(s) x {config.gpus_per_replica} GPU, "
        "batches of "
        f"{config.batch_size}, at most {config.max_new_tokens} new tokens, "
        f"prefix cache {'on' if config.prefix_caching else 'off'}",
        f"match answers to offsets ({config.offsets}, {'case-sensitive' if config.case_sensitive else 'any case'}); "
        f"write one row per document to {config.output} ({config.output_format}){exports}",
    ]


def _write_part(staging: storage.Location, part: int, tables: list[pa.Table]) -> None:
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(tables), buffer)
    storage.write_bytes(staging.join(f"part-{part:06d}.parquet"), buffer.getvalue().to_pybytes())


def _stream_to_staging(answered, staging: storage.Location) -> dict[str, Any]:
    """Write the engine's output as it comes, with progress; tally documents, queries and rejects."""
    counts: dict[str, Any] = {"documents": 0, "queries": 0, "rejected": {}}
    started = last = time.time()
    pending: list[pa.Table] = []
    parts = 0
    for table in answered.iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(table)
        if sum(t.num_rows for t in pending) >= STAGING_ROWS:
            _write_part(staging, parts, pending)
            parts, pending = parts + 1, []
        kinds = table["kind"].to_pylist()
        counts["documents"] += kinds.count("document")
        counts["queries"] += kinds.count("query")
        for kind, reason in zip(kinds, table["reason"].to_pylist()):
            if kind == "reject":
                counts["rejected"][reason] = counts["rejected"].get(reason, 0) + 1
        if time.time() - last >= PROGRESS_EVERY_S:
            last = time.time()
            elapsed = last - started
            log.info(
                "extract: %d documents (%.2f/s), %d queries (%.1f/s)",
                counts["documents"],
                counts["documents"] / elapsed,
                counts["queries"],
                counts["queries"] / elapsed,
            )
    if pending or not parts:  # an input without a single item still gets a (then empty) staging table
        _write_part(staging, parts, pending or [ANSWERED_SCHEMA.empty_table()])
    counts["engine_seconds"] = time.time() - started
    return counts


def _write_exports(config: ExtractConfig, output: storage.Location) -> None:
    """OUTPUT/_export/: the readable documents in each format asked for, one pass over the output."""
    dataset = pads.dataset(output.path, filesystem=output.fs, format=_dataset_format(config), schema=OUTPUT_SCHEMA)
    if not output.is_s3:
        output.fs.create_dir(output.join(EXPORT_DIR).path, recursive=True)
    formats = [name for name in config.export if name in spans.EXPORTS]
    streams = {
        name: output.fs.open_output_stream(output.join(EXPORT_DIR, spans.EXPORTS[name][0]).path) for name in formats
    }
    page: dict[bool, list[tuple[str, str, list]]] = {True: [], False: []}  # the page shows those with entities first
    counts: Counter[str] = Counter()
    documents = 0
    try:
        for batch in dataset.to_batches(columns=["doc_id", "status", "text", "entities"]):
            for row in batch.to_pylist():
                if row["status"] != "ok":
                    continue
                documents += 1
                counts.update(e["type"] for e in row["entities"])
                if len(page[bool(row["entities"])]) < HTML_DOCUMENTS:
                    page[bool(row["entities"])].append((row["doc_id"], row["text"], row["entities"]))
                for name, stream in streams.items():
                    stream.write(spans.EXPORTS[name][1](row["doc_id"], row["text"], row["entities"]).encode())
    finally:
        for stream in streams.values():
            stream.close()
    if "html" in config.export:
        title = f"uniner extract: {', '.join(entity_types(config))} in {config.input} ({short_name(config.model)})"
        shown = (page[True] + page[False])[:HTML_DOCUMENTS]
        html = spans.html_page(shown, counts=dict(counts), total_documents=documents, title=title)
        storage.write_text(output.join(EXPORT_DIR, spans.HTML_FILE), html)


def _dataset_format(config: ExtractConfig) -> str:
    return "parquet" if config.output_format == "parquet" else "json"


def _output_counts(config: ExtractConfig, output: storage.Location) -> dict[str, Any]:
    import pyarrow.compute as pc

    dataset = pads.dataset(output.path, filesystem=output.fs, format=_dataset_format(config), schema=OUTPUT_SCHEMA)
    counts = {"documents_written": 0, "documents_with_entities": 0, "entities": 0, "unmatched": 0}
    by_type: Counter = Counter()
    for batch in dataset.to_batches(columns=["entities", "unmatched"]):
        counts["documents_written"] += batch.num_rows
        lengths = pc.list_value_length(batch["entities"])
        counts["documents_with_entities"] += pc.sum(pc.greater(lengths, 0)).as_py() or 0
        counts["entities"] += pc.sum(lengths).as_py() or 0
        counts["unmatched"] += pc.sum(pc.list_value_length(batch["unmatched"])).as_py() or 0
        by_type.update(pc.list_flatten(batch["entities"]).field("type").to_pylist())
    return {**counts, "entities_by_type": dict(by_type.most_common())}


def run(config: ExtractConfig) -> dict[str, Any]:
    """Run the stage; returns the summary that is also written to OUTPUT/_summary.json."""
    import ray

    from uniner.models import resolve_model
    from uniner.session import cluster_cpus, init_ray

    started = time.time()
    types = entity_types(config)
    backend = pick_backend(config.backend)
    output = config.locate(config.output)
    files = document_files(config.input, input_format=config.input_format, s3_endpoint_url=config.s3_endpoint_url)
    model_dir = str(resolve_model(config.model, s3_endpoint_url=config.s3_endpoint_url))  # fetched once, here
    storage.prepare_output(output, overwrite=config.overwrite)
    init_ray()
    log.info(
        "extract: %d files, %d types, %s backend, %d replica(s) -> %s",
        len(files),
        len(types),
        backend,
        config.replicas,
        output,
    )

    items = [
        {"uri": f.uri, "path": f.path, "relative": rel, "index": i}
        for i, (f, rel) in enumerate(zip(files, relative_names(files)))
    ]
    queries = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        file_queries,
        fn_kwargs={"config": config, "model_dir": model_dir, "types": types, "filesystem": files[0].fs},
        batch_size=1,
        batch_format="numpy",
    )
    answered = engine_stage(
        queries,
        model_dir=model_dir,
        backend=backend,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        replicas=config.replicas,
        gpus_per_replica=config.gpus_per_replica,
        prefix_caching=config.prefix_caching,
    )
    staging = output.join(WORK_DIR, "staging")
    with storage.storage_errors("write", staging):
        counts = _stream_to_staging(answered, staging)

    log.info("extract: mapping answers to document offsets")
    staged = ray.data.read_parquet(staging.path, filesystem=staging.fs)
    documents = staged.groupby("doc_key", num_partitions=cluster_cpus()).map_groups(
        assemble_documents,
        fn_kwargs={"case_sensitive": config.case_sensitive, "whole_words": config.offsets == "words"},
        batch_format="pyarrow",
    )
    with storage.storage_errors("write", output):
        if config.output_format == "parquet":
            documents.write_parquet(output.path, filesystem=output.fs)
        else:
            documents.write_json(output.path, filesystem=output.fs, force_ascii=False)
        if config.export:
            _write_exports(config, output)
    written = _output_counts(config, output)

    seconds = time.time() - started
    summary = {
        "stage": "extract",
        "input": config.input,
        "output": config.output,
        "model": config.model,
        "backend": backend,
        "files": len(files),
        "types": types,
        "documents_read": counts["documents"],
        "rejected": dict(sorted(counts["rejected"].items())),
        **written,
        "records_written": written["documents_written"],
        "queries": counts["queries"],
        "documents_per_s": round(counts["documents"] / seconds, 3),
        "queries_per_s": round(counts["queries"] / max(counts["engine_seconds"], 1e-9), 2),
        "seconds": round(seconds, 1),
        "config": to_dict(config),
    }
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    storage.delete_tree(output.join(WORK_DIR))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    rejected = ", ".join(f"{reason} {n}" for reason, n in summary["rejected"].items()) or "none"
    return [
        f"documents read:     {summary['documents_read']} ({summary['documents_per_s']}/s overall)",
        f"documents written:  {summary['documents_written']} (rejected, with their reason: {rejected})",
        f"queries:            {summary['queries']} ({summary['queries_per_s']}/s while the engine ran; "
        f"{summary['backend']})",
        f"entities:           {summary['entities']} with offsets, in {summary['documents_with_entities']} documents; "
        f"{summary['unmatched']} answers not found in the text (column unmatched)",
        "by type:            " + (", ".join(f"{t} {n}" for t, n in summary["entities_by_type"].items()) or "none"),
        *(
            [f"page to open:       {summary['output']}/{EXPORT_DIR}/{spans.HTML_FILE}"]
            if "html" in summary["config"]["export"]
            else []
        ),
        f"took {summary['seconds']} s; summary in {summary['output']}/{storage.SUMMARY_FILE}",
    ]

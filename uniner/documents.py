"""Readers for document lakes: JSONL, Parquet and plain text, optionally gzip/zstd, from any storage location.

A file yields documents and rejects; nothing is dropped silently. Reject reasons: `empty`, `undecodable`,
`invalid_json`, `missing_field`, `unreadable` (a file that cannot be opened or parsed) and `unsupported_format`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from uniner import storage
from uniner.errors import UserError
from uniner.storage import Location

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PREVIEW_CHARS = 200
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str


@dataclass(frozen=True)
class Reject:
    source: str
    doc_id: str
    reason: str
    detail: str
    preview: str = ""


@dataclass(frozen=True)
class ReaderSettings:
    input_format: str = "auto"
    text_field: str = "text"
    id_field: str = ""


def document_files(uri: str, *, input_format: str, s3_endpoint_url: str) -> list[Location]:
    """The files of a documents input; an input where no file has a format we read is one clear error (its files
    would all be rejected, leaving nothing)."""
    files = storage.list_files(storage.locate(uri, s3_endpoint_url=s3_endpoint_url))
    if not any(detect_format(f.path, input_format)[0] for f in files):
        kinds = sorted({posixpath.splitext(f.path)[1] or "(no extension)" for f in files})
        raise UserError(
            f"none of the {len(files)} files at {uri} is .jsonl, .parquet or .txt (optionally .gz/.zst); "
            f"found {', '.join(kinds[:6])}: convert them, or pass --input-format txt to read them as text"
        )
    return files


def detect_format(path: str, input_format: str = "auto") -> tuple[str | None, str | None]:
    """(format, compression) of a file from its name; format None when the name says nothing we read."""
    stem, suffix = posixpath.splitext(path.lower())
    compression = COMPRESSIONS.get(suffix)
    if compression:
        stem, suffix = posixpath.splitext(stem)
    fmt = input_format if input_format != "auto" else FORMATS.get(suffix)
    if fmt == "parquet" and compression:
        return None, compression  # Parquet compresses inside the file; an outer gzip/zstd layer is not a Parquet file
    return fmt, compression


def preview(data: bytes | str) -> str:
    text = data if isinstance(data, str) else data[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    return text[:PREVIEW_CHARS]


def read_documents(location: Location, relative: str, settings: ReaderSettings) -> Iterator[Document | Reject]:
    """Every document of one file, and a Reject for every item that cannot become a document."""
    fmt, compression = detect_format(location.path, settings.input_format)
    source = location.uri
    if fmt is None:
        yield Reject(
            source,
            relative,
            "unsupported_format",
            "not .jsonl, .parquet or .txt (optionally .gz/.zst); set --input-format",
        )
        return
    try:
        size = location.fs.get_file_info(location.path).size
        if size == 0:
            yield Reject(source, relative, "empty", "the file is empty")
            return
        if fmt == "parquet":
            yield from _parquet(location, relative, settings)
        elif fmt == "jsonl":
            yield from _jsonl(location, relative, compression, settings)
        else:
            yield from _txt(location, relative, compression)
    except (OSError, pa.ArrowException) as error:  # corrupt files, denied or vanished objects
        yield Reject(source, relative, "unreadable", " ".join(str(error).split())[:300])


def _open(location: Location, compression: str | None):
    return location.fs.open_input_stream(location.path, compression=compression)


def _lines(stream) -> Iterator[bytes]:
    """Lines of a byte stream, read in chunks; a line longer than a chunk is gathered piece by piece."""
    pending: list[bytes] = []
    while chunk := stream.read(READ_CHUNK):
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            pending.append(chunk)
            continue
        pending.append(pieces[0])
        yield b"".join(pending)
        yield from pieces[1:-1]
        pending = [pieces[-1]]
    if pending and any(pending):
        yield b"".join(pending)


def _text_of(record: object, settings: ReaderSettings) -> tuple[str | None, str]:
    """The text of a record, or None and why not."""
    if not isinstance(record, dict):
        return None, f"the line is a JSON {type(record).__name__}, not an object"
    if settings.text_field not in record:
        return None, f"no field {settings.text_field!r}; set --text-field"
    text = record[settings.text_field]
    if not isinstance(text, str):
        return None, f"field {settings.text_field!r} is {type(text).__name__}, not a string"
    return text, ""


def _doc_id(record: dict, settings: ReaderSettings, default: str) -> str:
    value = record.get(settings.id_field) if settings.id_field else None
    return default if value is None or value == "" else str(value)


def _jsonl(
    location: Location, relative: str, compression: str | None, settings: ReaderSettings
) -> Iterator[Document | Reject]:
    source = location.uri
    with _open(location, compression) as stream:
        for number, raw in enumerate(_lines(stream), start=1):
            default_id = f"{relative}:{number}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Reject(source, default_id, "undecodable", f"invalid UTF-8 at byte {error.start}", preview(raw))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield Reject(source, default_id, "invalid_json", error.msg, preview(line))
                continue
            text, why = _text_of(record, settings)
            doc_id = _doc_id(record, settings, default_id) if isinstance(record, dict) else default_id
            if text is None:
                yield Reject(source, doc_id, "missing_field", why, preview(line))
            elif not text.strip():
                yield Reject(source, doc_id, "empty", "the text is empty")
            else:
                yield Document(doc_id, text, source)


def _parquet(location: Location, relative: str, settings: ReaderSettings) -> Iterator[Document | Reject]:
    source = location.uri
    with location.fs.open_input_file(location.path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if settings.text_field not in names:
            yield Reject(
                source,
                relative,
                "missing_field",
                f"no column {settings.text_field!r} (columns: {', '.join(names)}); set --text-field",
            )
            return
        columns = [settings.text_field] + (
            [settings.id_field] if settings.id_field in names and settings.id_field else []
        )
        row = 0
        for batch in parquet.iter_batches(columns=columns, batch_size=1024):
            records = batch.to_pylist()
            for record in records:
                default_id = f"{relative}:{row}"
                row += 1
                text, why = _text_of(record, settings)
                doc_id = _doc_id(record, settings, default_id)
                if text is None:
                    yield Reject(source, doc_id, "missing_field", why)
                elif not text.strip():
                    yield Reject(source, doc_id, "empty", "the text is empty")
                else:
                    yield Document(doc_id, text, source)


def _txt(location: Location, relative: str, compression: str | None) -> Iterator[Document | Reject]:
    source = location.uri
    with _open(location, compression) as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        yield Reject(source, relative, "undecodable", f"invalid UTF-8 at byte {error.start}", preview(data))
        return
    if not text.strip():
        yield Reject(source, relative, "empty", "the text is empty")
    else:
        yield Document(relative, text, source)


def relative_names(files: list[Location]) -> list[str]:
    """Short, stable names for document ids: each file's path relative to the files' common folder."""
    paths = [f.path for f in files]
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return [path[len(root) :].lstrip("/") or posixpath.basename(path) for path in paths]


def file_size(location: Location) -> int:
    return location.fs.get_file_info(location.path).size or 0

"""Readers for document lakes: every format and compression, and every bad input landing as a reject."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uniner import storage
from uniner.documents import Document, ReaderSettings, Reject, detect_format, read_documents, relative_names


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


def read(path, **settings):
    location = storage.locate(str(path))
    return list(read_documents(location, path.name, ReaderSettings(**settings)))


def jsonl(rows):
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode()


@pytest.mark.parametrize("suffix, compress", [("", lambda b: b), (".gz", gzip.compress), (".zst", lambda b: zstd(b))])
def test_jsonl_plain_gzip_and_zstd(tmp_path, suffix, compress):
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(jsonl([{"id": "a", "body": "Héllo Paris"}, {"body": "東京 🎉"}])))
    items = read(path, text_field="body", id_field="id")
    assert items == [Document("a", "Héllo Paris", str(path)), Document(f"docs.jsonl{suffix}:2", "東京 🎉", str(path))]


def test_parquet_with_id_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": ["x1", "x2"], "text": ["One.", "Two."]}), path)
    assert [(d.doc_id, d.text) for d in read(path, id_field="doc")] == [("x1", "One."), ("x2", "Two.")]
    assert [d.doc_id for d in read(path)] == ["docs.parquet:0", "docs.parquet:1"]


@pytest.mark.parametrize("suffix, compress", [("", lambda b: b), (".gz", gzip.compress)])
def test_txt_is_one_document_per_file(tmp_path, suffix, compress):
    path = tmp_path / f"note.txt{suffix}"
    path.write_bytes(compress("Line one.\n\nLine two.".encode()))
    assert read(path) == [Document(f"note.txt{suffix}", "Line one.\n\nLine two.", str(path))]


def test_bad_jsonl_lines_become_rejects_and_the_rest_is_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        jsonl([{"text": "good one"}])
        + b'{"text": "bad \xff byte"}\n'
        + b"{not json\n"
        + jsonl([{"title": "no text"}, {"text": "  "}, {"text": 5}, ["a"], {"text": "good two"}])
    )
    items = read(path)
    assert [i.text for i in items if isinstance(i, Document)] == ["good one", "good two"]
    rejects = [(i.doc_id, i.reason) for i in items if isinstance(i, Reject)]
    assert rejects == [
        ("mixed.jsonl:2", "undecodable"),
        ("mixed.jsonl:3", "invalid_json"),
        ("mixed.jsonl:4", "missing_field"),
        ("mixed.jsonl:5", "empty"),
        ("mixed.jsonl:6", "missing_field"),
        ("mixed.jsonl:7", "missing_field"),
    ]
    assert "no field 'text'; set --text-field" in items[3].detail


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet", "empty.txt"])
def test_empty_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert [(r.reason, r.detail) for r in read(path)] == [("empty", "the file is empty")]


def test_corrupt_parquet_is_unreadable(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all PAR1")
    [reject] = read(path)
    assert reject.reason == "unreadable" and reject.source == str(path)


def test_parquet_without_the_text_column(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    [reject] = read(path)
    assert reject.reason == "missing_field" and "columns: body" in reject.detail


def test_undecodable_txt_and_unknown_format(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "table.csv").write_text("a,b")
    assert read(tmp_path / "latin.txt")[0].reason == "undecodable"
    assert read(tmp_path / "table.csv")[0].reason == "unsupported_format"
    assert [i.text for i in read(tmp_path / "table.csv", input_format="txt")] == ["a,b"]


def test_a_50_mb_single_line_document_is_read_whole(tmp_path):
    text = ("word " * 10_000_000).strip()
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    [document] = read(path)
    assert len(document.text) == len(text) == 49_999_999


def test_unreadable_s3_object_is_a_reject(s3_bucket, s3_endpoint):
    location = storage.locate(f"{s3_bucket}/gone.jsonl", s3_endpoint_url=s3_endpoint)
    [reject] = read_documents(location, "gone.jsonl", ReaderSettings())
    assert reject.reason == "unreadable"


def test_detect_format_and_relative_names():
    assert detect_format("a/b.JSONL.ZST") == ("jsonl", "zstd")
    assert detect_format("a/b.parquet.gz") == (None, "gzip")
    files = [storage.locate(p) for p in ["/d/x/a.txt", "/d/y/b.txt"]]
    assert relative_names(files) == ["x/a.txt", "y/b.txt"]
    assert relative_names(files[:1]) == ["a.txt"]

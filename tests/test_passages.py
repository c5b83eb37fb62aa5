"""The passages stage on Ray Data: offsets, the token bound, dedup, sampling, rejects, S3 in and out."""

import gzip
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from uniner import passages, storage
from uniner.config import PassagesConfig
from uniner.errors import UserError

SHARED = "Shared boilerplate paragraph about Reuters and the Associated Press, repeated in two files."
DOCS = {
    "a-1": "Maria Keller flew from Berlin to Nairobi.\n\n" + SHARED,
    "a-2": "東京タワーは東京にあります。Émile visited it in 1998 🎉.",
    "b-1": SHARED + "\n\nFjord Shipping opened an office in Lisbon.",
}


@pytest.fixture
def lake(tmp_path):
    return make_lake(tmp_path)


def make_lake(tmp_path):
    """A small lake with every format and every kind of bad input."""
    lake = tmp_path / "lake"
    (lake / "sub").mkdir(parents=True)
    (lake / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": k, "text": DOCS[k]}, ensure_ascii=False) for k in ["a-1", "a-2"]) + "\n"
    )
    (lake / "sub" / "b.jsonl.gz").write_bytes(
        gzip.compress(
            (json.dumps({"id": "b-1", "text": DOCS["b-1"]}) + "\n" + '{"id": "b-2", "body": "no text"}\n').encode()
            + b'{"id": "b-3", "text": "\xff\xfe"}\n'
        )
    )
    pq.write_table(
        pa.table({"id": ["p-1", "p-2"], "text": ["Parquet row one mentions Seoul and Accra.", "ok"]}),
        lake / "c.parquet",
    )
    (lake / "d.txt").write_text("A plain text document about the Nile and Lake Geneva.")
    (lake / "empty.jsonl").write_text("")
    (lake / "broken.parquet").write_bytes(b"PAR1 garbage PAR1")
    (lake / "notes.csv").write_text("a,b\n")
    return lake


def config(tmp_path, lake, **overrides):
    values = {
        "input": str(lake),
        "output": str(tmp_path / "out"),
        "id_field": "id",
        "max_tokens": 16,
        "min_tokens": 3,
        "num_workers": 2,
    }
    return PassagesConfig(**{**values, **overrides})


def documents_by_id(lake):
    docs = dict(DOCS)
    docs.update(
        {
            "p-1": "Parquet row one mentions Seoul and Accra.",
            "p-2": "ok",
            "d.txt": "A plain text document about the Nile and Lake Geneva.",
        }
    )
    return docs


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ray_session):
    """One run over the lake, deduplicated, no sampling, inspected by several tests."""
    tmp_path = tmp_path_factory.mktemp("full")
    lake = make_lake(tmp_path)
    return tmp_path, lake, passages.run(config(tmp_path, lake))


def test_passages_keep_offsets_bound_and_drop_nothing_silently(full_run, tokenizer):
    tmp_path, lake, summary = full_run
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.column_names == passages.PASSAGE_COLUMNS
    rows = table.to_pylist()
    docs = documents_by_id(lake)
    for row in rows:
        assert docs[row["doc_id"]][row["char_start"] : row["char_end"]] == row["text"]
        assert 3 <= row["n_tokens"] <= 16
        assert row["n_tokens"] == len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
    assert len({r["passage_id"] for r in rows}) == len(rows)
    # The shared paragraph appears in two documents and is kept once, from the earlier file.
    shared = [r for r in rows if SHARED.startswith(r["text"]) or r["text"] in SHARED]
    assert {r["doc_id"] for r in shared} == {"a-1"}

    rejects = pads.dataset(str(tmp_path / "out" / "_rejects"), format="parquet").to_table().to_pylist()
    reasons = sorted((r["reason"], r["doc_id"]) for r in rejects if r["reason"] not in ("duplicate", "too_short"))
    assert reasons == [
        ("empty", "empty.jsonl"),
        ("missing_field", "b-2"),
        ("undecodable", "sub/b.jsonl.gz:3"),
        ("unreadable", "broken.parquet"),
        ("unsupported_format", "notes.csv"),
    ]
    too_short = [r for r in rejects if r["reason"] == "too_short"]
    assert "p-2" in {r["doc_id"] for r in too_short}
    assert all(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) < 3 for r in too_short)
    assert all(docs[r["doc_id"]][r["char_start"] : r["char_end"]] == r["text"] for r in too_short)
    duplicates = [r for r in rejects if r["reason"] == "duplicate"]
    assert duplicates and all(r["doc_id"] == "b-1" for r in duplicates)
    assert summary["documents_read"] == 6  # a-1, a-2, b-1, p-1, p-2, d.txt
    assert summary["files"] == 7
    assert summary["passages_written"] == len(rows)
    assert summary["dropped"]["duplicate"] == len(duplicates)
    assert sum(summary["dropped"].values()) == len(rejects)
    assert summary["candidate_passages"] == len(rows) + len(duplicates)
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["passages_written"] == len(rows)
    assert not (tmp_path / "out" / "_work").exists()


def test_sampling_keeps_the_smallest_seeded_ranks(full_run, tmp_path):
    _, lake, _ = full_run
    everything = pads.dataset(str(full_run[0] / "out"), format="parquet").to_table()["passage_id"].to_pylist()

    def sample(seed):
        passages.run(config(tmp_path, lake, output=str(tmp_path / f"s{seed}"), sample_size=4, seed=seed))
        return pads.dataset(str(tmp_path / f"s{seed}"), format="parquet").to_table()["passage_id"].to_pylist()

    for seed in (0, 1):
        expected = sorted(everything, key=lambda pid: passages.sample_key(seed, pid))[:4]
        assert sorted(sample(seed)) == sorted(expected)  # the same set on every run and partitioning
    assert (
        sorted(everything, key=lambda p: passages.sample_key(0, p))[:4]
        != sorted(everything, key=lambda p: passages.sample_key(1, p))[:4]
    )


def test_no_dedup_keeps_repeats(tmp_path, lake, ray_session):
    summary = passages.run(config(tmp_path, lake, dedup=False))
    assert "duplicate" not in summary["dropped"]
    texts = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()["text"].to_pylist()
    assert len(texts) > len(set(texts))


def test_existing_output_needs_overwrite(full_run):
    tmp_path, lake, _ = full_run
    with pytest.raises(UserError, match="already holds files: pass --overwrite"):
        passages.run(config(tmp_path, lake))


def test_s3_input_and_output(tmp_path, lake, ray_session, s3_bucket, s3_endpoint):
    storage.upload_tree(str(lake), storage.locate(f"{s3_bucket}/lake", s3_endpoint_url=s3_endpoint))
    summary = passages.run(
        config(tmp_path, lake, input=f"{s3_bucket}/lake", output=f"{s3_bucket}/passages", s3_endpoint_url=s3_endpoint)
    )
    out = storage.locate(f"{s3_bucket}/passages", s3_endpoint_url=s3_endpoint)
    table = pads.dataset(out.path, filesystem=out.fs, format="parquet").to_table()
    assert table.num_rows == summary["passages_written"] > 0
    assert summary["dropped"]["unreadable"] == 1
    assert storage.read_json(out.join("_summary.json"))["files"] == 7


@pytest.mark.slow
def test_cli_end_to_end_prints_the_summary(tmp_path, lake):
    result = run_cli(
        "passages",
        "--input",
        str(lake),
        "--output",
        str(tmp_path / "cli"),
        "--id-field",
        "id",
        "--max-tokens",
        "16",
        "--min-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "documents read:    6" in result.stdout
    assert "dropped by reason: " in result.stdout and "unreadable 1" in result.stdout


def test_duplicates_found_across_files_by_full_64_bit_keys(tmp_path):
    def staging(name, rows):
        table = pa.Table.from_pylist(
            [{**row, "kind": row.get("kind", "passage")} for row in rows], schema=passages.STAGING_SCHEMA
        )
        pq.write_table(table, tmp_path / name)
        return storage.locate(str(tmp_path / name))

    big = 2**63 + 12345
    first = staging(
        "a.parquet",
        [
            {"passage_id": "a0", "dedup_key": big, "sample_key": 1},
            {"kind": "reject", "reason": "empty"},
            {"passage_id": "a2", "dedup_key": big + 1, "sample_key": 2},
        ],
    )
    second = staging(
        "b.parquet",
        [
            {"passage_id": "b0", "dedup_key": big + 1, "sample_key": 3},
            {"passage_id": "b1", "dedup_key": big, "sample_key": 4},
        ],
    )
    duplicate_of, kept_sample_keys = passages.find_duplicates([first, second])
    # Keys one apart near 2**63 stay apart; the earliest of equal keys (file order, then row order) is kept.
    assert duplicate_of == [{}, {0: "a2", 1: "a0"}]
    assert sorted(kept_sample_keys.tolist()) == [1, 2]
    assert (
        passages.sample_threshold(kept_sample_keys, 1) == 1 and passages.sample_threshold(kept_sample_keys, 2) is None
    )

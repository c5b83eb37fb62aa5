"""The extract stage: offsets and merge rules, long documents, exports, the CLI on vLLM and transformers with the
built-in student, and S3 (losing a Ray node mid-extract is in test_multinode.py)."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import run_cli

from uniner import extract, spans, storage
from uniner.config import ExtractConfig
from uniner.errors import UserError

# ---- answers -> offsets (pure functions) ----


def test_every_occurrence_with_word_boundaries():
    text = "York, New York and Yorkshire; york. NewYork"
    assert spans.find_spans(text, "York") == [(0, 4), (10, 14)]
    assert spans.find_spans(text, "York", whole_words=False) == [(0, 4), (10, 14), (19, 23), (39, 43)]
    assert spans.find_spans(text, "york", case_sensitive=False) == [(0, 4), (10, 14), (30, 34)]
    assert spans.find_spans(text, "Paris") == []
    assert spans.find_spans(text, "  ") == []


def test_case_insensitive_match_keeps_the_document_spelling():
    text = "ÉMILE met émile and İstanbul."
    entities, unmatched = spans.locate(text, [("Émile", "person"), ("istanbul", "location")], case_sensitive=False)
    assert [(e["text"], e["start"]) for e in entities] == [("ÉMILE", 0), ("émile", 10), ("İstanbul", 20)]
    assert unmatched == []
    for entity in entities:
        assert text[entity["start"] : entity["end"]] == entity["text"]


def test_unicode_offsets_are_code_points_and_cjk_has_no_word_boundaries():
    text = "🎉 東京タワーは東京にあります。Zoë Müller-Lüdenscheidt 🎉 C++ (beta)"
    entities, unmatched = spans.locate(
        text, [("東京", "location"), ("Zoë Müller-Lüdenscheidt", "person"), ("C++", "language"), ("(beta)", "version")]
    )
    assert unmatched == []
    assert [e["start"] for e in entities if e["type"] == "location"] == [2, 8]
    for entity in entities:
        assert text[entity["start"] : entity["end"]] == entity["text"]


def test_whitespace_in_an_answer_matches_any_whitespace_and_text_is_the_documents():
    text = "The Bank of\nEngland raised rates."
    [entity], _ = spans.locate(text, [("Bank of England", "organization")])
    assert entity == {"text": "Bank of\nEngland", "type": "organization", "start": 4, "end": 19}


def test_matches_stay_within_the_passage_asked_about():
    text = "Paris is here. Lyon is there. Paris again."
    entities, unmatched = spans.locate(text, [("Paris", "location"), ("Lyon", "location")], start=15, end=len(text))
    assert [(e["start"], e["end"]) for e in entities] == [(30, 35), (15, 19)]
    assert unmatched == []
    _, unmatched = spans.locate(text, [("Lyon", "location")], start=30, end=len(text))
    assert unmatched == [{"text": "Lyon", "type": "location"}]


def test_merge_drops_duplicates_and_same_type_overlaps_but_keeps_other_types():
    def e(start, end, kind):
        return {"text": "x" * (end - start), "type": kind, "start": start, "end": end}

    merged = spans.merge(
        [
            e(0, 8, "loc"),
            e(4, 8, "loc"),
            e(0, 8, "loc"),
            e(6, 12, "loc"),
            e(4, 8, "org"),
            e(20, 24, "loc"),
            e(22, 30, "loc"),
        ]
    )
    assert [(m["start"], m["end"], m["type"]) for m in merged] == [(0, 8, "loc"), (4, 8, "org"), (22, 30, "loc")]
    assert spans.merge_unmatched(
        [{"text": "a", "type": "t"}, {"text": "a", "type": "t"}, {"text": "a", "type": "u"}]
    ) == [{"text": "a", "type": "t"}, {"text": "a", "type": "u"}]


def test_exports():
    text = "New York City hosts Pfizer."
    entities = [
        {"text": "New York City", "type": "location", "start": 0, "end": 13},
        {"text": "York", "type": "organization", "start": 4, "end": 8},
        {"text": "Pfizer", "type": "organization", "start": 20, "end": 26},
    ]
    conll = spans.to_conll("d1", text, entities)
    assert conll.splitlines() == [
        "# id = d1",
        "New\tB-location",
        "York\tI-location",
        "City\tI-location",
        "hosts\tO",
        "Pfizer\tB-organization",
        ".\tO",
        "",
    ]
    assert conll.endswith("\n\n")
    spacy = json.loads(spans.to_spacy("d1", text, entities))
    assert spacy["ents"][0] == {"start": 0, "end": 13, "label": "location"} and spacy["text"] == text
    gliner = json.loads(spans.to_gliner("d1", text, entities))
    assert gliner["tokenized_text"] == ["New", "York", "City", "hosts", "Pfizer", "."]
    assert gliner["ner"] == [[0, 2, "location"], [1, 1, "organization"], [4, 4, "organization"]]


def test_types_from_a_file_and_bad_settings(tmp_path):
    (tmp_path / "types.txt").write_text("person\n\n# comment\nlocation\nperson\n")
    config = ExtractConfig(input="x", output="y", types=[f"@{tmp_path / 'types.txt'}"])
    assert extract.entity_types(config) == ["person", "location"]
    with pytest.raises(UserError, match="does not exist"):
        extract.entity_types(ExtractConfig(input="x", output="y", types=["@/nowhere/types.txt"]))
    with pytest.raises(UserError, match="--export"):
        ExtractConfig(input="x", output="y", types=["person"], export=["brat"]).check()


def test_jsonl_output_is_read_back_with_its_schema_whatever_the_first_file_holds(tmp_path):
    """A JSON-lines file whose lists are all empty reads as lists of nulls; the counts and exports read every file
    with the output's own schema, so a later file with entities and unmatched answers still reads."""
    empty = {"doc_id": "a", "source": "s", "status": "ok", "detail": None, "text": "x", "queries": 1}
    found = {
        **empty,
        "doc_id": "b",
        "text": "Bern",
        "entities": [{"text": "Bern", "type": "city", "start": 0, "end": 4}],
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0.json").write_text(json.dumps({**empty, "entities": [], "unmatched": []}) + "\n")
    (tmp_path / "out" / "1.json").write_text(
        json.dumps({**found, "unmatched": [{"text": "Uri", "type": "city"}]}) + "\n"
    )
    config = ExtractConfig(
        input="x", output=str(tmp_path / "out"), types=["city"], output_format="jsonl", export=["conll"]
    )
    output = storage.locate(config.output)
    counts = extract._output_counts(config, output)
    assert (counts["documents_written"], counts["entities"], counts["unmatched"]) == (2, 1, 1)
    extract._write_exports(config, output)
    assert "Bern\tB-city" in (tmp_path / "out" / "_export" / "conll.txt").read_text()


# ---- a long document split into passages and merged back ----


def test_long_document_split_and_merged_back_into_document_offsets(tmp_path, builtin_model_dir):
    sentences = [f"Sentence {i} says that Ada Lovelace met Charles Babbage in London." for i in range(60)]
    document = " ".join(sentences) + " Finally Ada Lovelace wrote to Mary Somerville."
    (tmp_path / "doc.txt").write_text(document)
    config = ExtractConfig(
        input=str(tmp_path), output=str(tmp_path / "out"), types=["person", "location"], passage_tokens=64
    )
    location = storage.locate(str(tmp_path / "doc.txt"))
    batch = {"uri": [location.uri], "path": [location.path], "relative": ["doc.txt"], "index": [0]}
    rows = pa.concat_tables(
        extract.file_queries(
            batch, config=config, model_dir=str(builtin_model_dir), types=["person", "location"], filesystem=location.fs
        )
    ).to_pylist()
    queries = [r for r in rows if r["kind"] == "query"]
    assert len({r["char_start"] for r in queries}) > 5  # several passages
    assert all(r["prompt"].endswith(f"What describes {r['type']} in the text? ASSISTANT:") for r in queries)
    answers = {
        "person": '["Ada Lovelace", "Charles Babbage", "Mary Somerville", "Alan Turing"]',
        "location": "Sure: ['London']",
    }
    for row in queries:
        row["generated"] = " " + answers[row["type"]]
    result = extract.document_row(rows, case_sensitive=True, whole_words=True)
    assert result["status"] == "ok" and result["queries"] == len(queries)
    by_type = {}
    for entity in result["entities"]:
        assert document[entity["start"] : entity["end"]] == entity["text"]
        by_type.setdefault(entity["type"], []).append(entity["text"])
    assert by_type["location"].count("London") == 60
    assert by_type["person"].count("Ada Lovelace") == 61 and by_type["person"].count("Mary Somerville") == 1
    # Answers absent from the passage they were asked about are kept apart, once per (text, type).
    assert {"text": "Alan Turing", "type": "person"} in result["unmatched"]
    assert {"text": "Mary Somerville", "type": "person"} in result["unmatched"]  # said for passages that lack her


# ---- the CLI end to end on both engines ----

LAKE_DOCS = {
    "en": "Maria Keller flew from Berlin to Nairobi with Fjord Shipping in 2019.",
    "news": "Angela Merkel met executives of Siemens in Munich on Tuesday.",
    "uni": "東京タワーは東京にあります。Émile Zola visited Zürich 🎉.",
    "empty": "",
}


def make_lake(folder):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": k, "text": v}, ensure_ascii=False) for k, v in LAKE_DOCS.items()]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n{not json\n")
    (folder / "b.txt").write_text("Ada Lovelace wrote notes on the Analytical Engine in London.")
    return folder


def check_output(out, output_format):
    formatted = "parquet" if output_format == "parquet" else "json"
    table = pads.dataset(str(out), format=formatted, schema=extract.OUTPUT_SCHEMA).to_table()
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(["en", "news", "uni", "empty", "a.jsonl:5", "b.txt"])  # each document once
    assert table.num_rows == 6
    assert rows["empty"]["status"] == "empty" and rows["a.jsonl:5"]["status"] == "invalid_json"
    for doc_id in ("en", "news", "uni", "b.txt"):
        row = rows[doc_id]
        assert row["status"] == "ok" and row["queries"] == 3
        for entity in row["entities"]:
            assert row["text"][entity["start"] : entity["end"]] == entity["text"]
    assert rows["uni"]["text"] == LAKE_DOCS["uni"]
    # No --model: the built-in student, which finds people, an organization and cities with their offsets, and no
    # span that is not one of the sentence's names (a name may carry a second type).
    found = {(e["type"], e["text"], e["start"], e["end"]) for e in rows["en"]["entities"]}
    assert {
        ("person", "Maria Keller", 0, 12),
        ("city", "Berlin", 23, 29),
        ("city", "Nairobi", 33, 40),
        ("organization", "Fjord Shipping", 46, 60),
    } <= found
    assert {text for _, text, _, _ in found} == {"Maria Keller", "Berlin", "Nairobi", "Fjord Shipping"}
    found = {(e["type"], e["text"], e["start"], e["end"]) for e in rows["news"]["entities"]}
    assert {("person", "Angela Merkel", 0, 13), ("city", "Munich", 43, 49)} <= found
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["documents_read"] == 4 and summary["rejected"] == {"empty": 1, "invalid_json": 1}
    assert summary["documents_written"] == 6 and summary["queries"] == 12
    return rows, summary


def cli_run(tmp_path, *options, env=None):
    lake = make_lake(tmp_path / "lake")
    out = tmp_path / "out"
    result = run_cli(
        "extract",
        "--input",
        str(lake),
        "--output",
        str(out),
        "--types",
        "person,organization,city",
        "--id-field",
        "id",
        "--max-new-tokens",
        "24",
        *options,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    pytest.importorskip("vllm")
    # A temp dir of the run's own, to see what it leaves there: short, as socket paths must be; Ray's stay in /tmp.
    temp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    env = {"TMPDIR": str(temp), "RAY_TMPDIR": "/tmp"}
    out, result = cli_run(
        tmp_path_factory.mktemp("vllm"), "--backend", "vllm", "--export", "conll,spacy,gliner,html", env=env
    )
    yield out, result, temp
    shutil.rmtree(temp)


@pytest.fixture(scope="module")
def transformers_run(tmp_path_factory):
    return cli_run(
        tmp_path_factory.mktemp("hf"), "--backend", "transformers", "--output-format", "jsonl", "--batch-size", "4"
    )


def test_cli_on_vllm(vllm_run):
    out, result, temp = vllm_run
    rows, summary = check_output(out, "parquet")
    assert summary["backend"] == "vllm" and "queries:" in result.stdout and "by type:" in result.stdout
    assert sum(summary["entities_by_type"].values()) == summary["entities"]
    assert summary["documents_with_entities"] == sum(1 for row in rows.values() if row["entities"])
    spacy = [json.loads(line) for line in (out / "_export" / "spacy.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in spacy) == ["b.txt", "en", "news", "uni"]
    conll = (out / "_export" / "conll.txt").read_text()
    assert conll.count("# id = ") == 4 and "Zürich\t" in conll
    assert len((out / "_export" / "gliner.jsonl").read_text().splitlines()) == 4
    page = (out / "_export" / "entities.html").read_text()
    assert page.count("<article>") == 4 and "Zürich" in page and "page to open:" in result.stdout
    # vLLM's inter-process sockets went into a folder of the engine's own, removed when the engine's process ended.
    assert not [path for path in temp.rglob("*") if path.is_socket()]


def test_cli_on_transformers(transformers_run):
    out, _ = transformers_run
    _, summary = check_output(out, "jsonl")
    assert summary["backend"] == "transformers"


def test_cli_bad_input_is_one_line(tmp_path):
    result = run_cli(
        "extract", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--types", "person", "--offsets", "fuzzy"
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--offsets" in result.stderr


# ---- S3 and large documents (transformers: quick engine starts) ----


def test_s3_in_and_out_with_an_empty_unicode_and_5mb_document(
    ray_session, tiny_model_dir, s3_bucket, s3_endpoint, tmp_path
):
    import boto3

    big = ("Grace Hopper worked in Arlington. " * 160_000)[: 5 * 1024 * 1024]
    lines = [json.dumps({"id": k, "text": v}, ensure_ascii=False) for k, v in {**LAKE_DOCS, "big": big}.items()]
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key="lake/docs.jsonl", Body="\n".join(lines).encode()
    )
    config = ExtractConfig(
        input=f"{s3_bucket}/lake",
        output=f"{s3_bucket}/out",
        types=["person"],
        model=str(tiny_model_dir),
        backend="transformers",
        id_field="id",
        max_new_tokens=1,
        batch_size=256,
        passage_tokens=448,
        s3_endpoint_url=s3_endpoint,
    )
    summary = extract.run(config)
    assert summary["documents_read"] == 4 and summary["rejected"] == {"empty": 1}
    output = storage.locate(f"{s3_bucket}/out", s3_endpoint_url=s3_endpoint)
    rows = {
        r["doc_id"]: r for r in pads.dataset(output.path, filesystem=output.fs, format="parquet").to_table().to_pylist()
    }
    assert sorted(rows) == ["big", "empty", "en", "news", "uni"]
    assert rows["big"]["text"] == big and rows["big"]["queries"] > 1000  # split into thousands of passages
    assert rows["uni"]["text"] == LAKE_DOCS["uni"]
    assert storage.exists(output.join("_summary.json")) and not storage.exists(output.join("_work"))


def run_chromium(page: Path, profile: Path, *options: str) -> str:
    """Headless Chromium on a local page with a 900x500 window; its standard output (for --dump-dom)."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium): the browser check is skipped")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        "--window-size=900,500",
        *options,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def test_html_page_highlights_entities_by_type_and_shows_in_a_browser(tmp_path):
    """The page escapes the text, colours each type, counts every document; Chromium draws the highlights, and a
    long unbroken run of text wraps inside the window instead of widening the page."""
    text = "Ada Lovelace met <Charles Babbage> in London in 1833. See https://example.org/" + "A1b2" * 80
    entities = [
        {"text": "Ada Lovelace", "type": "person", "start": 0, "end": 12},
        {"text": "Charles Babbage", "type": "person", "start": 18, "end": 33},
        {"text": "London", "type": "city", "start": 38, "end": 44},
    ]
    page = spans.html_page(
        [("doc-1", text, entities)], counts={"person": 5, "city": 2}, total_documents=4, title="people & places"
    )
    assert "&lt;<mark" in page and "Charles Babbage<span>person</span></mark>&gt;" in page
    assert "7 entities in 4 documents (1 shown)" in page and "people &amp; places" in page
    assert page.index(">person</mark> 5") < page.index(">city</mark> 2")  # the legend, most frequent first
    path = tmp_path / "entities.html"
    path.write_text(page)

    shot = tmp_path / "page.png"
    run_chromium(path, tmp_path / "profile", f"--screenshot={shot}")
    from matplotlib.image import imread

    pixels = (imread(shot)[:, :, :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in spans.PALETTE[:2]:  # person's and city's highlight colours are on screen
        rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
        assert ((abs(pixels - rgb).sum(axis=1)) <= 6).sum() > 200, colour

    measured = tmp_path / "measured.html"  # the page plus a script that writes its width into the DOM
    measured.write_text(
        page + "<script>document.body.dataset.width ="
        " document.documentElement.scrollWidth + '/' + document.documentElement.clientWidth</script>"
    )
    width = re.search(r'data-width="(\d+)/(\d+)"', run_chromium(measured, tmp_path / "profile", "--dump-dom"))
    assert width is not None and int(width[1]) <= int(width[2]), width and width[0]

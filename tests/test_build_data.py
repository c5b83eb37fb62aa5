"""`uniner build-data`: exact conversations, negative sampling, imports, BIO conversion and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli

from uniner import bio
from uniner.build_data import NegativeSampler, run, text_windows, type_variant_merges, vary_forms
from uniner.config import BuildDataConfig
from uniner.conversations import type_statistics
from uniner.errors import UserError
from uniner.formats import question

ACK = {"from": "gpt", "value": "I've read this text."}
REPOSITORY = Path(__file__).resolve().parents[1]


def _annotations(tmp_path, rows):
    entity = pa.struct([("text", pa.string()), ("type", pa.string())])
    schema = pa.schema(
        [("passage_id", pa.string()), ("text", pa.string()), ("entities", pa.list_(entity)), ("status", pa.string())]
    )
    folder = tmp_path / "annotations"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")
    return folder


def _build(tmp_path, *, input, **settings):
    """Build from one input; returns the records and that input's report."""
    config = BuildDataConfig(input=[str(input)], output=str(tmp_path / "out"), **settings)
    config.check()
    summary = run(config)
    return json.loads((tmp_path / "out" / "conversations.json").read_text()), summary["inputs"][0]


def _qa(record):
    turns = record["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(2, len(turns), 2)]


def test_exact_conversation_from_annotations(tmp_path):
    rows = [
        {
            "passage_id": "p1",
            "text": "Ada Lovelace met Charles Babbage in London.",
            "status": "ok",
            "entities": [
                {"text": "London", "type": "city"},
                {"text": "Charles Babbage", "type": "person"},
                {"text": "Ada Lovelace", "type": "person"},
                {"text": "Ada Lovelace", "type": "person"},
            ],
        },
        {
            "passage_id": "p2",
            "text": "The Analytical Engine.",
            "status": "ok",
            "entities": [{"text": "Analytical Engine", "type": "machine"}],
        },
    ]
    records, summary = _build(tmp_path, input=str(_annotations(tmp_path, rows)), negatives_per_passage=1)
    # p1 lacks only `machine`, so its one negative is forced.
    assert records[0] == {
        "id": "p1",
        "conversations": [
            {"from": "human", "value": "Text: Ada Lovelace met Charles Babbage in London."},
            ACK,
            {"from": "human", "value": "What describes person in the text?"},
            {"from": "gpt", "value": '["Ada Lovelace", "Charles Babbage"]'},
            {"from": "human", "value": "What describes city in the text?"},
            {"from": "gpt", "value": '["London"]'},
            {"from": "human", "value": "What describes machine in the text?"},
            {"from": "gpt", "value": "[]"},
        ],
    }
    assert _qa(records[1])[0] == ("What describes machine in the text?", '["Analytical Engine"]')
    assert _qa(records[1])[1][1] == "[]" and len(_qa(records[1])) == 2
    assert summary["statistics"]["passages"] == 2 and summary["statistics"]["entities"] == 4
    assert summary["statistics"]["types"] == 3 and summary["statistics"]["negative_questions"] == 2


def test_bad_annotations_are_counted_not_silently_lost(tmp_path):
    rows = [
        {
            "passage_id": "ok",
            "text": "Paris is big.",
            "status": "ok",
            "entities": [
                {"text": "Paris", "type": "city"},
                {"text": "Rome", "type": "city"},
                {"text": " ", "type": "city"},
            ],
        },
        {"passage_id": "bad", "text": "x", "status": "malformed", "entities": []},
        {"passage_id": "err", "text": "y", "status": "error", "entities": None},
        {"passage_id": "empty", "text": "z", "status": "ok", "entities": []},
    ]
    records, summary = _build(tmp_path, input=str(_annotations(tmp_path, rows)), negatives_per_passage=0)
    assert [r["id"] for r in records] == ["ok"] and _qa(records[0]) == [
        ("What describes city in the text?", '["Paris"]')
    ]
    assert summary["counts"] == {
        "entities dropped: not in the passage": 1,
        "entities dropped: empty text or type": 1,
        "passages skipped: status malformed": 1,
        "passages skipped: status error": 1,
        "passages skipped: no entities": 1,
    }


def test_negatives_follow_type_frequency():
    sampler = NegativeSampler(Counter({"a": 600, "b": 300, "c": 100}), seed=7)
    draws = Counter(t for i in range(20000) for t in sampler.sample(f"p{i}", exclude=set(), k=1))
    assert abs(draws["a"] / 20000 - 0.6) < 0.015 and abs(draws["b"] / 20000 - 0.3) < 0.015
    # Excluding the passage's own types renormalizes over the rest: b:c = 3:1.
    draws = Counter(t for i in range(8000) for t in sampler.sample(f"q{i}", exclude={"a"}, k=1))
    assert set(draws) == {"b", "c"} and abs(draws["b"] / 8000 - 0.75) < 0.02
    # Without replacement, and never more than there are types left.
    assert sorted(sampler.sample("r", exclude={"a"}, k=5)) == ["b", "c"]
    assert sampler.sample("r", exclude={"a"}, k=2) == sampler.sample("r", exclude={"a"}, k=2)


def test_type_variants_merge_into_the_most_frequent_form():
    merges = type_variant_merges(
        Counter({"person": 10, "Person": 3, "persons": 1, "company": 5, "companies": 2, "class": 4})
    )
    assert merges == {"Person": "person", "persons": "person", "companies": "company"}
    stats = type_statistics(Counter({"person": 10, "city": 5, "x": 1}))
    assert stats["entities"] == 16 and stats["types_seen_once"] == 1
    assert stats["top_1pct_types"] == 1 and stats["top_1pct_types_mention_share"] == round(10 / 16, 4)
    many = type_statistics(Counter({"person": 50, "city": 30, **{f"type{i}": 1 for i in range(120)}}))
    assert many["types"] == 122 and many["top_1pct_types"] == 2 and many["top_1pct_types_mention_share"] == 0.4


def test_merged_variants_are_reported(tmp_path):
    rows = [
        {
            "passage_id": "p",
            "text": "Ada and Bob.",
            "status": "ok",
            "entities": [{"text": "Ada", "type": "person"}, {"text": "Bob", "type": "Persons"}],
        }
    ]
    records, summary = _build(
        tmp_path, input=str(_annotations(tmp_path, rows)), negatives_per_passage=0, merge_type_variants=True
    )
    assert _qa(records[0]) == [("What describes person in the text?", '["Ada", "Bob"]')]
    assert summary["statistics"]["type_merges"] == {"Persons": "person"}


def test_pile_ner_sample_round_trips_unchanged(tmp_path, shared_data):
    source = shared_data / "pile-ner-sample" / "pile_ner_type_sample.json"
    records, summary = _build(tmp_path, input=str(source))
    assert records == json.loads(source.read_text())
    assert summary["statistics"]["passages"] == 882 and not summary["counts"]


def test_several_inputs_are_concatenated(tmp_path, shared_data):
    source = shared_data / "pile-ner-sample" / "pile_ner_type_sample.json"
    bio_file = tmp_path / "x.txt"
    bio_file.write_text("Ada\tB-person\n")
    config = BuildDataConfig(input=[str(source), str(bio_file)], output=str(tmp_path / "out"), dataset_name="mine")
    summary = run(config)
    records = json.loads((tmp_path / "out" / "conversations.json").read_text())
    assert records[:-1] == json.loads(source.read_text())
    assert records[-1]["conversations"][0]["value"] == "Dataset: mine\nText: Ada" and records[-1]["dataset"] == "mine"
    assert [r["input_kind"] for r in summary["inputs"]] == ["conversations", "bio"] and summary["files"] == {
        "conversations.json": 883
    }


def test_input_shares_keep_a_seeded_sample_of_each_input_in_order(tmp_path, shared_data):
    source = shared_data / "pile-ner-sample" / "pile_ner_type_sample.json"
    bio_file = tmp_path / "x.txt"
    bio_file.write_text("".join(f"W{i}\tB-person\n\n" for i in range(40)))

    def built(shares, seed=0):
        config = BuildDataConfig(
            input=[str(source), str(bio_file)],
            output=str(tmp_path / f"out-{shares}-{seed}"),
            input_shares=shares,
            seed=seed,
        )
        config.check()
        summary = run(config)
        return json.loads((tmp_path / f"out-{shares}-{seed}" / "conversations.json").read_text()), summary

    records, summary = built(["1", "0.25"])
    texts = [r["conversations"][0]["value"] for r in records[882:]]
    assert records[:882] == json.loads(source.read_text()) and len(texts) == 10
    assert texts == sorted(texts, key=lambda t: int(t.split("W")[1]))  # original order kept
    assert summary["inputs"][1]["counts"]["records left out by --input-shares"] == 30
    assert built([1, 0.25])[0] == records and built([1, 0.25], seed=1)[0] != records
    for bad in (["0.5"], ["1", "0"], ["1", "x"]):
        with pytest.raises(UserError, match="--input-shares"):
            BuildDataConfig(input=[str(source), str(bio_file)], output="o", input_shares=bad).check()


def test_conversation_files_are_validated(tmp_path):
    good = {
        "id": "a",
        "conversations": [
            {"from": "human", "value": "Text: Paris."},
            ACK,
            {"from": "human", "value": "What describes city in the text?"},
            {"from": "gpt", "value": '["Paris"]'},
        ],
    }
    unanswered = {"id": "b", "conversations": good["conversations"][:3]}
    source = tmp_path / "train.json"
    source.write_text(json.dumps([good, unanswered]))
    records, summary = _build(tmp_path, input=str(source))
    assert records == [good]
    assert summary["counts"] == {
        "repairs: unanswered last question dropped": 1,
        "records skipped: no question with an answer": 1,
    }
    bad_answer = {"id": "c", "conversations": good["conversations"][:3] + [{"from": "gpt", "value": "Paris"}]}
    source.write_text(json.dumps([good, bad_answer]))
    with pytest.raises(UserError, match=r"record 2 \(id c\): answer in turn 3 is not a JSON list"):
        _build(tmp_path, input=str(source), overwrite=True)
    lines = tmp_path / "train.jsonl"  # the line that breaks is named, counted from the top of the file
    lines.write_text(json.dumps(good) + "\n\n" + json.dumps(good)[:40] + "\n" + json.dumps(good) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:3: not valid JSON \(.* at column \d+\): fix or remove that line"):
        _build(tmp_path, input=str(lines), overwrite=True)


def test_crossner_sentence_to_conversation(tmp_path, shared_data):
    data = bio.read_bio(str(shared_data / "crossner" / "ai" / "dev.txt"))
    first = data.sentences[0]
    assert first.text.startswith("Here , accuracy is measured by error rate")
    assert [(e.text, e.type) for e in first.entities][:2] == [("accuracy", "metrics"), ("error rate", "metrics")]
    assert all(s.text[e.start : e.end] == e.text for s in data.sentences for e in s.entities)
    assert "program language" in data.types and "organization" in data.types and "misc" not in data.types

    records, summary = _build(
        tmp_path, input=str(shared_data / "crossner" / "ai" / "dev.txt"), dataset_name="CrossNER_AI"
    )
    assert records[0]["dataset"] == "CrossNER_AI"
    assert records[0]["conversations"][0]["value"] == "Dataset: CrossNER_AI\nText: " + first.text
    answers = dict(_qa(records[0]))
    assert json.loads(answers["What describes metrics in the text?"])[:2] == ["accuracy", "error rate"]
    assert len(answers) == len(data.types) and summary["counts"]["sentences: ai-dev"] == len(data.sentences)


def test_mit_files_read_tag_first_with_their_type_names(tmp_path, shared_data):
    movie = bio.read_bio(str(shared_data / "mit" / "movie" / "train.bio"))  # the tag-first order is detected
    assert movie.sentences[0].text == "what movies star bruce willis"
    assert [(e.text, e.type) for e in movie.sentences[0].entities] == [("bruce willis", "actor")]
    assert "average ratings" in movie.types and "ratings_average" not in movie.types
    restaurant = bio.read_bio(str(shared_data / "mit" / "restaurant" / "train.bio"), column_order="tag-token")
    assert "Restaurant Name" in restaurant.types and "Rating" in restaurant.types
    with pytest.raises(UserError, match="columns may be swapped"):
        bio.read_bio(str(shared_data / "mit" / "movie" / "train.bio"), column_order="token-tag")


def test_eval_queries_one_per_sentence_and_type(tmp_path):
    source = tmp_path / "music" / "dev.txt"
    source.parent.mkdir()
    source.write_text("Queen\tB-band\nplayed\tO\nrock\tB-musicgenre\n\nHello\tO\n")
    config = BuildDataConfig(input=[str(source)], output=str(tmp_path / "out"), eval_queries=True)
    run(config)
    queries = json.loads((tmp_path / "out" / "music-dev.json").read_text())
    assert [(q["id"], _qa(q)) for q in queries] == [
        ("music-dev-0-0", [("What describes band in the text?", '["Queen"]')]),
        ("music-dev-0-1", [("What describes music genre in the text?", '["rock"]')]),
        ("music-dev-1-0", [("What describes band in the text?", "[]")]),
        ("music-dev-1-1", [("What describes music genre in the text?", "[]")]),
    ]


def test_bio_repairs_and_errors_name_file_and_line(tmp_path, caplog):
    source = tmp_path / "x.txt"
    source.write_text("New\tB-location\nYork\tI-location\nGoogle\tI-organisation\n")
    with caplog.at_level("WARNING", logger="uniner.bio"):
        data = bio.read_bio(str(source))
    assert f"{source}: 1 x I- tag starting an entity (read as B-)" in caplog.text  # said as it is read
    assert [(e.text, e.type) for e in data.sentences[0].entities] == [
        ("New York", "location"),
        ("Google", "organization"),
    ]
    assert data.repairs == Counter({"I- tag starting an entity (read as B-)": 1})
    source.write_text("a\tO\nb\tO\textra\n")
    with pytest.raises(UserError, match=rf"^{source}:2: expected 2 tab-separated columns"):
        bio.read_bio(str(source))
    source.write_text("a\tQ-x\n")
    with pytest.raises(UserError, match=rf"^{source}:1: tag 'Q-x'"):
        bio.read_bio(str(source))
    source.write_text("\n\n")
    with pytest.raises(UserError, match="holds no sentences"):
        bio.read_bio(str(source))


def test_label_map_file_overrides_builtin_names(tmp_path):
    source, mapping = tmp_path / "x.txt", tmp_path / "map.yaml"
    source.write_text("Ada\tB-PER\nParis\tB-LOC\nfoo\tB-misc\n")
    mapping.write_text("PER: person\nLOC: null\n")
    data = bio.read_bio(str(source), label_map=bio.read_label_map(str(mapping)))
    assert [(e.text, e.type) for e in data.sentences[0].entities] == [("Ada", "person")] and data.types == ["person"]


def test_cli_builds_from_s3_and_reports(tmp_path, s3_endpoint, s3_bucket):
    import boto3

    rows = [
        {
            "passage_id": "p",
            "text": "Ada met Bob.",
            "status": "ok",
            "entities": [{"text": "Ada", "type": "person"}, {"text": "Bob", "type": "person"}],
        }
    ]
    local = _annotations(tmp_path, rows)
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(
        str(local / "part-0.parquet"), s3_bucket[5:], "ann/part-0.parquet"
    )
    result = run_cli(
        "build-data", "--input", f"{s3_bucket}/ann", "--output", f"{s3_bucket}/conv", "--s3-endpoint-url", s3_endpoint
    )
    assert result.returncode == 0, result.stderr
    assert "1 records" in result.stdout and "person (2)" in result.stdout
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket[5:], Key="conv/conversations.json")
    assert json.loads(body["Body"].read())[0]["id"] == "p"
    bad = run_cli("build-data", "--input", str(tmp_path / "none.json"), "--output", str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_type_forms_and_lower_case_records_are_seeded_and_keep_answers(tmp_path):
    record = {
        "id": "r1",
        "conversations": [
            {"from": "human", "value": "Text: Ada Lovelace met Charles Babbage in London."},
            ACK,
            {"from": "human", "value": "What describes person in the text?"},
            {"from": "gpt", "value": '["Ada Lovelace"]'},
            {"from": "human", "value": "What describes programming language in the text?"},
            {"from": "gpt", "value": "[]"},
        ],
    }
    forms = set()
    for seed in range(40):
        varied = vary_forms(record, type_forms=True, lowercase_share=0.5, seed=seed)
        assert varied == vary_forms(record, type_forms=True, lowercase_share=0.5, seed=seed)
        (person, answer), (language, empty) = _qa(varied)
        lower = varied["conversations"][0]["value"] == "Text: ada lovelace met charles babbage in london."
        assert answer == ('["ada lovelace"]' if lower else '["Ada Lovelace"]') and empty == "[]"
        forms.add(language.removeprefix("What describes ").removesuffix(" in the text?"))
    assert forms == {
        "programming language",
        "Programming language",
        "Programming Language",
        "PROGRAMMING LANGUAGE",
        "programming_language",
    }
    assert vary_forms(record, type_forms=False, lowercase_share=0.0, seed=0) == record


def _passage(record_id, text, qa):
    turns = [{"from": "human", "value": f"Text: {text}"}, ACK]
    for entity_type, answer in qa:
        turns += [{"from": "human", "value": question(entity_type)}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "conversations": turns}


def test_absent_types_come_from_other_records_and_skip_types_the_text_visibly_holds(tmp_path):
    records = [
        _passage("a", "Ada Lovelace wrote in London.", [("person", '["Ada Lovelace"]')]),
        _passage("b", "Python runs on Linux.", [("programming language", '["Python"]'), ("city", "[]")]),
        _passage("c", "The Rhine flows past Basel.", [("river", '["Rhine"]')]),
        _passage("d", "London and Basel grew.", [("city", '["London", "Basel"]')]),
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    built, report = _build(tmp_path, input=tmp_path / "in.json", absent_types_per_passage=2)
    named = {"person", "programming language", "river", "city"}  # "city" asked of b is not a source: no entity
    added = {}
    for before, after in zip(records, built):
        qa = _qa(after)
        assert qa[: len(_qa(before))] == _qa(before)  # the record's own questions stay, first and unchanged
        extra = qa[len(_qa(before)) :]
        assert all(answer == "[]" for _, answer in extra)
        added[after["id"]] = {q.removeprefix("What describes ").removesuffix(" in the text?") for q, _ in extra}
    assert all(types <= named for types in added.values())
    assert added["a"] == {"programming language", "river"}  # "city": London, a city elsewhere, is in its text
    assert added["b"] == {"person", "river"}  # asks city itself
    assert added["c"] == {"person", "programming language"}  # "city": Basel
    assert len(added["d"]) == 2 and "city" not in added["d"]
    assert report["statistics"]["absent_type_questions"] == 8
    assert _build(tmp_path, input=tmp_path / "in.json", absent_types_per_passage=2, overwrite=True)[0] == built


def test_the_demo_evaluation_passages_stay_out_of_the_student_recipe(tmp_path, shared_data, monkeypatch):
    """jobs/cpu-student.yaml trains the built-in student; jobs/local.yaml evaluates on the held-out passages and
    annotates a corpus of other recorded passages: the three sets of passages are disjoint."""
    from uniner.conversations import text_of
    from uniner.corpus import write_recorded_corpus
    from uniner.pipeline import resolve
    from uniner.recorded import heldout_texts

    heldout = heldout_texts()
    assert len(heldout) == 40
    monkeypatch.chdir(REPOSITORY)
    raw = yaml.safe_load((REPOSITORY / "jobs" / "cpu-student.yaml").read_text())
    raw["build-data"]["output"] = str(tmp_path / "student-data")
    _, configs = resolve(raw, "in jobs/cpu-student.yaml")
    summary = run(configs["build-data"])
    trained = {text_of(r) for r in json.loads((tmp_path / "student-data" / "conversations.json").read_text())}
    assert summary["inputs"][0]["counts"]["records held out by --holdout"] == 40
    assert len(trained) > 2000 and not trained & heldout
    corpus = tmp_path / "corpus"
    write_recorded_corpus(str(corpus), documents=260)
    demo = {json.loads(line)["text"] for line in (corpus / "part-000.jsonl").read_text().splitlines()}
    assert len(demo) == 260 and not demo & heldout


def test_windows_cut_texts_at_sentence_ends_and_keep_each_window_its_own_entities(tmp_path):
    text = "Ada Lovelace met Charles Babbage in London. They talked.\nBabbage built engines!  Later Ada went to Paris."
    assert text_windows(text, 8) == [
        "Ada Lovelace met Charles Babbage in London.",
        "They talked.\nBabbage built engines!",
        "Later Ada went to Paris.",
    ]
    assert text_windows("one two three four five", 2) == ["one two", "three four", "five"]  # no sentence end
    # A closing quote stays with the sentence it closes, as in the chunks extract asks about.
    assert text_windows('She said "Stop." Then she left the room at once.', 4) == [
        'She said "Stop."',
        "Then she left the",
        "room at once.",
    ]
    records = [
        _passage("long", text, [("person", '["Ada Lovelace", "Charles Babbage", "Babbage"]'), ("city", "[]")]),
        _passage("short", "Ada slept.", [("person", '["Ada"]')]),
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    built, report = _build(tmp_path, input=tmp_path / "in.json", window_words=8)
    assert [r["id"] for r in built] == ["long-w0", "long-w1", "long-w2", "short"]
    assert [_qa(r) for r in built[:3]] == [
        [(question("person"), '["Ada Lovelace", "Charles Babbage", "Babbage"]'), (question("city"), "[]")],
        [(question("person"), '["Babbage"]'), (question("city"), "[]")],
        [(question("person"), "[]"), (question("city"), "[]")],  # "Ada" alone is not an answer the teacher gave
    ]
    assert built[3] == records[1]  # a text that fits one window stays as it was
    assert report["statistics"]["windowed_records"] == 4

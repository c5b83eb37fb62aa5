"""`uniner evaluate`: every rule of the official protocol, hand-computed, and the report files."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from uniner.config import EvaluateConfig
from uniner.errors import UserError
from uniner.evaluate import Query, normalize, official_items, reference_domain, run, score_dataset


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Apple", "apple"),  # lower case
        ("U.S.A.", "usa"),  # ASCII punctuation removed
        ("Rock-n-roll!", "rocknroll"),
        ("The Beatles", "beatles"),  # articles removed
        ("a cat and an owl", "cat and owl"),
        ("theater Anthem", "theater anthem"),  # only whole words are articles
        ("  New \t York ", "new york"),  # whitespace collapsed
        ("“Zürich”", "“zürich”"),  # non-ASCII punctuation is not in the official set
    ],
)
def test_normalization(raw, normalized):
    assert normalize(raw) == normalized


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ('["Paris", "the Rome"]', ["paris", "rome"]),
        ('["Paris", "paris.", "The Paris"]', ["paris"]),  # duplicates after normalization
        ('["Paris"] and then some chatter', ["paris"]),
        ('Answer: ["Paris"]', []),  # the list must start the answer
        ('["Paris",\n"Rome"]', []),  # one line only
        ("['Paris']", []),  # not JSON
        ('["a]b"]', []),  # cut at the first ]
        ('["Paris", 3]', []),  # a non-string item fails the whole answer
        ('[["Paris", "city"]]', []),  # cut at the first ], a nested list never parses
        ('[{"x": 1}]', []),
        ("", []),
        ("[]", []),
    ],
)
def test_official_parser(text, items):
    assert official_items(text) == items


def _query(gold, qid="q", entity_type="city", text="x", spans=None):
    turns = [
        ("human", f"Text: {text}"),
        ("gpt", "I've read this text."),
        ("human", f"What describes {entity_type} in the text?"),
    ]
    return Query(
        dataset="d", id=qid, prompt_turns=turns, entity_type=entity_type, text=text, gold=gold, gold_spans=spans
    )


def test_micro_scores_match_the_official_arithmetic():
    queries = [_query('["Paris", "Rome"]', "1"), _query('["Oslo"]', "2", "river"), _query("[]", "3"), _query("[]", "4")]
    outputs = {
        ("d", "1"): 'USER: x ASSISTANT: ["paris", "London", "Paris"]',  # 1 right, 1 wrong, a duplicate
        ("d", "2"): "I don't know",  # a parse failure is []
        ("d", "3"): '["Bergen"]',  # a prediction where the gold is empty
        # "4" has no prediction: scored as []
    }
    scores = score_dataset(queries, outputs)
    precision, recall = 1 / (3 + 1e-10), 1 / (3 + 1e-10)
    assert scores["precision"] == precision and scores["recall"] == recall
    assert scores["f1"] == 2 * precision * recall / (precision + recall + 1e-10)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["missing_predictions"]) == (1, 2, 2, 1)
    assert scores["per_type"]["river"]["f1"] == 0.0 and scores["per_type"]["city"]["tp"] == 1


def test_all_empty_scores_zero_not_an_error():
    scores = score_dataset([_query("[]")], {("d", "q"): "[]"})
    assert scores["precision"] == scores["recall"] == scores["f1"] == 0.0


def test_lenient_and_span_scores_are_ours_and_apart():
    text = "Paris and Paris , Rome"
    query = _query('["Paris", "Rome"]', text=text, spans={(0, 5), (17, 21)})
    scores = score_dataset([query], {("d", "q"): 'Sure! ["Paris", "Rom"]'})
    assert scores["f1"] == 0.0  # officially, the list must start the answer
    lenient = scores["ours_lenient_parser"]
    assert (lenient["tp"], lenient["fp"], lenient["fn"]) == (1, 1, 1)
    # "Paris" stands for both of its occurrences; only the first is gold; "Rom" is not a whole token.
    span = scores["ours_span"]
    assert (span["tp"], span["fp"], span["fn"]) == (1, 1, 1)
    assert score_dataset([_query("[]")], {})["ours_span"] is None


def test_reference_domains():
    assert [
        reference_domain(n) for n in ("CrossNER_AI", "ai-dev", "mit-movie", "restaurant-train", "conll2003-test")
    ] == ["ai", "ai", "movie", "restaurant", None]


@pytest.fixture
def eval_files(tmp_path):
    """Two tiny evaluation files: one BIO, one in the UniNER evaluation JSON shape."""
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "dev.txt").write_text("Queen\tB-band\nplayed\tO\nrock\tB-musicgenre\n\nHello\tO\n")
    record = {
        "id": "7",
        "conversations": [
            {"from": "human", "value": "Text: Ada met Bob in Paris."},
            {"from": "gpt", "value": "I've read this text."},
            {"from": "human", "value": "What describes person in the text?"},
            {"from": "gpt", "value": '["Ada", "Bob"]'},
        ],
    }
    (tmp_path / "people.json").write_text(json.dumps([record]))
    return [str(tmp_path / "music" / "dev.txt"), str(tmp_path / "people.json")]


def test_report_files_from_predictions(tmp_path, eval_files):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"id": "music-dev-0-0", "output": '["Queen"]'},
                {"id": "music-dev-0-1", "output": '["pop"]'},
                {"id": "music-dev-1-0", "output": "[]"},
                {"id": "music-dev-1-1", "output": "[]"},
                {"id": "7", "output": '["Ada"]'},
                {"id": "nope", "output": "[]"},
            ]
        )
        + "\n"
    )
    config = EvaluateConfig(data=eval_files, predictions=str(predictions), output=str(tmp_path / "r"))
    config.check()
    summary = run(config)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    music, people = report["datasets"]["music-dev"], report["datasets"]["people"]
    assert (music["tp"], music["fp"], music["fn"], music["n_queries"]) == (1, 1, 1, 4)
    assert (people["tp"], people["fp"], people["fn"], people["n_queries"]) == (1, 0, 1, 1)
    assert report["average_f1"] == pytest.approx((music["f1"] + people["f1"]) / 2)
    assert all(0 <= v <= 1 for s in report["datasets"].values() for v in (s["precision"], s["recall"], s["f1"]))
    assert report["unknown_predictions"] == 1 and summary["unknown_predictions"] == 1
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| music-dev | 4 | 50.0% | 50.0% | 50.0% |" in markdown and "UniNER-7B (paper) | 65.0%" in markdown
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_with_ids_in_several_datasets_need_the_dataset(tmp_path, eval_files):
    other = tmp_path / "other.json"
    other.write_text((tmp_path / "people.json").read_text())
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": "7", "output": "[]"}) + "\n")
    config = EvaluateConfig(data=[eval_files[1], str(other)], predictions=str(predictions), output=str(tmp_path / "r"))
    with pytest.raises(UserError, match="several datasets"):
        run(config)
    predictions.write_text(json.dumps({"dataset": "other", "id": "7", "output": '["Ada", "Bob"]'}) + "\n")
    summary = run(
        EvaluateConfig(
            data=[eval_files[1], str(other)],
            predictions=str(predictions),
            output=str(tmp_path / "r"),
            overwrite=True,
            allow_missing=True,
        )
    )
    assert (
        summary["datasets"]["other"]["f1"] == pytest.approx(1.0)
        and summary["datasets"]["people"]["missing_predictions"] == 1
    )


def test_cli_errors_are_one_line(tmp_path, eval_files):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("not json\n")
    result = run_cli(
        "evaluate", "--data", eval_files[1], "--predictions", str(predictions), "--output", str(tmp_path / "r")
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "p.jsonl:1" in result.stderr
    result = run_cli(
        "evaluate",
        "--data",
        eval_files[1],
        "--predictions",
        str(predictions),
        "--model",
        "m",
        "--output",
        str(tmp_path / "r"),
    )
    assert result.returncode == 2 and "not both" in result.stderr


@pytest.mark.parametrize(
    "lines, problem",
    [
        ([{"id": "7", "output": "[]"}], "answer 1 of 5 queries: predict them all"),
        ([], "answer 0 of 5 queries"),
        (
            [{"id": "7", "output": "[]"}, {"id": "7", "output": '["Ada"]'}],
            r"p.jsonl:2: a second prediction for id '7' of people "
            r"\(the first is at .*p.jsonl:1\)",
        ),
        ([["7", "[]"]], r"p.jsonl:1: expected a JSON object \{"),
    ],
)
def test_predictions_that_leave_queries_out_or_repeat_are_refused(tmp_path, eval_files, lines, problem):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = EvaluateConfig(data=eval_files, predictions=str(predictions), output=str(tmp_path / "r"))
    with pytest.raises(UserError, match=problem):
        run(config)
    assert not (tmp_path / "r").exists()  # refused before the output is touched


def test_allow_missing_scores_what_is_there_and_states_the_coverage(tmp_path, eval_files):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": "7", "output": '["Ada", "Bob"]'}) + "\n")
    result = run_cli(
        "evaluate",
        "--data",
        ",".join(eval_files),
        "--predictions",
        str(predictions),
        "--output",
        str(tmp_path / "r"),
        "--allow-missing",
    )
    assert result.returncode == 0, result.stderr
    assert "predictions cover 20.0% of 5 queries; the rest count as empty answers" in result.stdout
    assert json.loads((tmp_path / "r" / "report.json").read_text())["coverage"] == pytest.approx(0.2)

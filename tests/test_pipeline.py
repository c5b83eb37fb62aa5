"""`uniner pipeline`: how stages are wired together from one file."""

from __future__ import annotations

from uniner.pipeline import resolve


def test_each_stage_reads_the_output_it_needs(tmp_path):
    raw = {
        "workdir": str(tmp_path),
        "sample_corpus_docs": 10,
        "stages": ["passages", "annotate", "build-data", "train", "extract", "evaluate"],
        "extract": {"types": ["person"]},
        "evaluate": {"data": ["dev.txt"]},
    }
    _, configs = resolve(raw, "in test")
    corpus, out = f"{tmp_path}/corpus", {name: f"{tmp_path}/{name}" for name in configs}
    assert configs["passages"].input == corpus and configs["annotate"].input == out["passages"]
    assert configs["build-data"].input == [out["annotate"]] and configs["train"].data == out["build-data"]
    # Extraction reads the documents, not the checkpoint; the model it runs is the one just trained.
    assert configs["extract"].input == corpus and configs["extract"].model == out["train"]
    assert configs["evaluate"].model == out["train"]


def test_settings_in_the_file_win_and_stages_may_be_left_out(tmp_path):
    raw = {
        "workdir": str(tmp_path),
        "stages": ["build-data", "train", "evaluate"],
        "build-data": {"input": "a.json"},
        "evaluate": {"data": ["dev.txt"], "output": str(tmp_path / "report")},
    }
    _, configs = resolve(raw, "in test")
    assert configs["build-data"].input == ["a.json"] and configs["train"].data == f"{tmp_path}/build-data"
    assert configs["evaluate"].model == f"{tmp_path}/train" and configs["evaluate"].output == str(tmp_path / "report")


def test_a_stage_run_alone_reads_what_an_earlier_run_wrote(tmp_path):
    raw = {
        "workdir": str(tmp_path),
        "stages": ["annotate"],
        "passages": {"input": "docs/", "output": str(tmp_path / "p")},
    }
    _, configs = resolve(raw, "in test")
    assert list(configs) == ["annotate"] and configs["annotate"].input == str(tmp_path / "p")


def test_without_a_trained_model_extract_and_evaluate_run_the_built_in_student(tmp_path):
    from uniner.config import STUDENT_MODEL

    raw = {
        "workdir": str(tmp_path),
        "stages": ["passages", "extract", "evaluate"],
        "passages": {"input": "docs/"},
        "extract": {"types": ["person"]},
        "evaluate": {"data": ["dev.txt"]},
    }
    _, configs = resolve(raw, "in test")
    assert configs["extract"].model == configs["evaluate"].model == STUDENT_MODEL
    (tmp_path / "train").mkdir()  # an earlier run trained (or began to train) one: that is the model then
    _, configs = resolve(raw, "in test")
    assert configs["extract"].model == configs["evaluate"].model == f"{tmp_path}/train"


def test_the_trained_model_is_looked_up_only_where_a_stage_reads_it(tmp_path, monkeypatch):
    from uniner import storage

    looked_up = []
    monkeypatch.setattr(storage, "exists", lambda location: looked_up.append(location.uri) or False)
    raw = {"workdir": str(tmp_path), "stages": ["passages", "annotate"], "passages": {"input": "docs/"}}
    resolve(raw, "in test")
    assert looked_up == []
    resolve({**raw, "stages": ["passages", "extract"], "extract": {"types": ["person"]}}, "in test")
    assert looked_up == [f"{tmp_path}/train"]


def test_an_evaluate_that_scores_predictions_runs_no_model(tmp_path):
    raw = {
        "workdir": str(tmp_path),
        "stages": ["train", "evaluate"],
        "train": {"data": "conversations.json"},
        "evaluate": {"data": ["dev.txt"], "predictions": "answers.jsonl"},
    }
    _, configs = resolve(raw, "in test")
    assert configs["evaluate"].model == "" and configs["evaluate"].predictions == "answers.jsonl"


def test_dry_run_of_a_fresh_recipe_plans_every_stage(tmp_path):
    from conftest import run_cli

    train_json = tmp_path / "train.json"
    train_json.write_text(
        '[{"id": "a", "conversations": [{"from": "human", "value": "Text: Ada"}, {"from": "gpt", "value": "ok"}, '
        '{"from": "human", "value": "What describes person in the text?"}, {"from": "gpt", "value": "[\\"Ada\\"]"}]}]'
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"workdir: {tmp_path}/run\nstages: [build-data, train, evaluate]\nbuild-data: {{input: [{train_json}]}}\n"
        f"evaluate: {{data: [{tmp_path}/dev.txt]}}\n"
    )
    result = run_cli("pipeline", str(recipe), "--dry-run", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"write conversations.json and _summary.json to {tmp_path}/run/build-data" in result.stdout
    assert "(reads the output of build-data, written first)" in result.stdout
    assert "(reads the output of train, written first)" in result.stdout
    assert not (tmp_path / "run").exists()


def test_a_stage_is_skipped_only_with_the_settings_it_ran_with(tmp_path, ray_session, tiny_model_dir, capsys):
    """An empty output is never taken as finished, and changed settings are named with the fix."""
    import json

    import pytest

    from uniner.errors import UserError
    from uniner.pipeline import run_file

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(
        "".join(json.dumps({"body": f"Ada Lovelace wrote notes number {i} in London."}) + "\n" for i in range(4))
    )
    recipe = tmp_path / "recipe.yaml"

    def write(text_field: str, max_tokens: int) -> None:
        recipe.write_text(
            f"workdir: {tmp_path}/run\nstages: [passages]\npassages: {{input: {docs}, tokenizer: "
            f"{tiny_model_dir}, text_field: {text_field}, max_tokens: {max_tokens}, min_tokens: 1}}\n"
        )

    write("text", 64)  # the documents hold `body`: no passage at all
    with pytest.raises(UserError, match="stage passages wrote 0 records to .*: check its input and settings"):
        run_file(str(recipe), overrides=[], dry_run=False)
    write("body", 64)  # fixed: the empty output is not "finished", so the stage runs again
    assert run_file(str(recipe), overrides=[], dry_run=False) == 0
    assert "passages written:  4" in capsys.readouterr().out
    assert run_file(str(recipe), overrides=[], dry_run=False) == 0  # same settings: skipped
    write("body", 32)
    with pytest.raises(
        UserError,
        match=r"stage passages finished earlier in .* with other settings \(max_tokens 64 -> 32\): "
        r"add --set passages.overwrite=true",
    ):
        run_file(str(recipe), overrides=[], dry_run=False)
    assert run_file(str(recipe), overrides=["passages.overwrite=true"], dry_run=False) == 0
    assert run_file(str(recipe), overrides=[], dry_run=False) == 0  # now finished with these settings

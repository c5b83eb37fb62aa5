"""The `uniner` command as a user meets it: help, dry runs, and one clear line for bad input."""

import dataclasses
import json

import pytest
from conftest import run_cli

from uniner.config import STAGES


def test_help_lists_the_seven_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert list(STAGES) == ["passages", "annotate", "build-data", "train", "extract", "evaluate"]
    for name in [*STAGES, "pipeline"]:
        assert f"\n    {name}" in result.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_documents_every_setting(stage):
    result = run_cli(stage, "--help")
    assert result.returncode == 0
    for spec in dataclasses.fields(STAGES[stage].config):
        assert "--" + spec.name.replace("_", "-") in result.stdout
    assert "--dry-run" in result.stdout and "--config" in result.stdout


def test_passages_dry_run_prints_settings_and_plan_and_writes_nothing(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(json.dumps({"text": "Hello Paris."}) + "\n")
    (docs / "b.txt").write_text("Bonjour.")
    out = tmp_path / "out"
    result = run_cli("passages", "--input", str(docs), "--output", str(out), "--max-tokens", "64", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "max_tokens: 64" in result.stdout
    assert "read 2 files" in result.stdout and "1 jsonl, 1 txt" in result.stdout
    assert not out.exists()


def test_yaml_config_and_override_on_the_command_line(tmp_path):
    (tmp_path / "d.txt").write_text("Hello.")
    config = tmp_path / "p.yaml"
    config.write_text(f"input: {tmp_path / 'd.txt'}\noutput: {tmp_path / 'o'}\nseed: 4\nmax_tokens: 99\n")
    result = run_cli("passages", "--config", str(config), "--seed", "5", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout and "max_tokens: 99" in result.stdout


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("uniner: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_input_path(tmp_path):
    result = run_cli("passages", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    _assert_one_line_error(result, "nothing", "does not exist", "check the path")


def test_unknown_setting_in_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input: a\noutput: b\nchunk_size: 3\n")
    _assert_one_line_error(run_cli("passages", "--config", str(config)), "unknown setting 'chunk_size'")


def test_unreadable_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"input: \xff\xfe\n")
    _assert_one_line_error(run_cli("passages", "--config", str(config)), "not valid YAML")


def test_model_spec_that_cannot_be_resolved(tmp_path):
    (tmp_path / "d.txt").write_text("Hello there, Paris.")
    result = run_cli(
        "passages", "--input", str(tmp_path / "d.txt"), "--output", str(tmp_path / "o"), "--tokenizer", "not a model!"
    )
    _assert_one_line_error(result, "model 'not a model!' is not a local folder")


def test_unreachable_storage(tmp_path):
    result = run_cli(
        "passages",
        "--input",
        "s3://bucket/docs/",
        "--output",
        str(tmp_path / "o"),
        "--s3-endpoint-url",
        "http://127.0.0.1:9",
        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
    )
    _assert_one_line_error(result, "s3://bucket/docs", "cannot be reached", "endpoint")


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("passages", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_pipeline_set_override_reaches_the_stage(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\nsample_corpus_docs: 5\nstages: [passages]\n")
    result = run_cli("pipeline", str(config), "--set", "passages.max_tokens=77", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "max_tokens: 77" in result.stdout
    assert f"input: {tmp_path / 'w' / 'corpus'}" in result.stdout


@pytest.mark.parametrize(
    "stage, inside", [("passages", False), ("passages", True), ("extract", False), ("extract", True)]
)
def test_an_output_that_meets_an_input_is_refused_before_anything_is_deleted(tmp_path, stage, inside):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(json.dumps({"text": "Alice met Bob in Paris."}) + "\n")
    output = docs / "out" if inside else docs
    extra = ["--types", "person"] if stage == "extract" else []
    result = run_cli(stage, "--input", str(docs), "--output", str(output), "--overwrite", *extra)
    _assert_one_line_error(
        result,
        f"--output {output} {'lies inside' if inside else 'is'} the --input {docs}",
        "choose an output folder apart from the inputs",
    )
    assert (docs / "a.jsonl").read_text().startswith('{"text"')


@pytest.mark.parametrize(
    "output, source, relation",
    [
        ("d", "d", "is"),
        ("d", "d/x.jsonl", "contains"),
        ("d/out", "d", "lies inside"),
        ("out", "d", ""),
        ("d", "d/*.jsonl", "contains"),
        ("d/out", "d/*.jsonl", ""),
        ("d/out", "d/*", "lies inside"),
        ("s3://b/x", "s3://b/x/", "is"),
        ("s3://b/x", "s3://b/xy", ""),
        ("s3://b", "s3://b/x/*.gz", "contains"),
    ],
)
def test_output_and_input_overlap(output, source, relation):
    from uniner.storage import overlap

    assert overlap(output, source) == relation


def test_a_pipeline_stage_whose_output_meets_its_input_is_refused(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\nstages: [passages]\npassages: {{input: {tmp_path / 'w'}}}\n")
    (tmp_path / "w").mkdir()
    _assert_one_line_error(run_cli("pipeline", str(config), "--dry-run"), "lies inside the --input")


def test_a_set_mistake_is_blamed_on_the_set_and_yaml_lists_are_read(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\nsample_corpus_docs: 5\nstages: [passages]\n")
    _assert_one_line_error(
        run_cli("pipeline", str(config), "--set", "passages.max_tokens=abc", "--dry-run"),
        "setting 'max_tokens' in --set passages.max_tokens=abc: expected an integer",
    )
    _assert_one_line_error(
        run_cli("pipeline", str(config), "--set", "passages.max_tokenz=9", "--dry-run"),
        "--set passages.max_tokenz=9: unknown setting 'max_tokenz' for stage passages",
    )
    result = run_cli("pipeline", str(config), "--set", "stages=[passages, annotate]", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stages:\n- passages\n- annotate\n" in result.stdout


def test_options_are_spelt_out_and_switches_take_true_or_false(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Bonjour.")
    base = ["passages", "--input", str(docs), "--output", str(tmp_path / "o"), "--dry-run"]
    _assert_one_line_error(
        run_cli(*base, "--max-token", "9"), "has no option '--max-token'", "did you mean --max-tokens?"
    )
    for switch, value in ((["--dedup", "false"], "false"), (["--no-dedup"], "false"), (["--dedup"], "true")):
        result = run_cli(*base, *switch)
        assert result.returncode == 0 and f"dedup: {value}" in result.stdout, result.stderr
    usage = run_cli("passages", "--help").stdout
    assert "(required)" in usage.split("  --input STR", 1)[1].split("--output", 1)[0] and "(default: '')" not in usage


def test_a_folder_without_documents_is_one_line(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text("# Notes")
    (docs / "table.csv").write_text("a,b\n")
    _assert_one_line_error(
        run_cli("passages", "--input", str(docs), "--output", str(tmp_path / "o")),
        "none of the 2 files",
        "found .csv, .md",
        "--input-format txt",
    )
    assert not (tmp_path / "o").exists()


def test_every_row_of_the_bad_input_table_names_a_test_that_exists():
    """docs/errors.md says what a user sees for each kind of bad input; each row names the test that pins it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = [
        line for line in (root / "docs" / "errors.md").read_text().splitlines() if line.startswith("| ") and "`" in line
    ]
    named = 0
    for row in rows:
        test_file = None
        for file, name in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", row):
            test_file = file or test_file
            assert f"def {name}(" in (root / "tests" / test_file).read_text(), (test_file, name)
            named += 1
    assert named >= 15


def test_where_the_output_went_is_named_when_ray_failed_to_start(tmp_path, monkeypatch, capsys):
    """A Ray that timed out at startup leaves a diverted stderr file, no logs folder: the last line names the file."""
    from uniner import cli

    monkeypatch.setattr(cli, "diverted", lambda: {"stderr": str(tmp_path / "stderr.log")})
    status = cli.main(["passages", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert status == 2 and last == f"this process's other output: {tmp_path / 'stderr.log'} (--debug shows it here)"
    monkeypatch.setattr(cli, "diverted", lambda: {"stderr": "err.log", "logs": "ray-logs"})
    cli.main(["passages", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "Ray's logs: ray-logs; this process's other output: err.log (--debug shows both here)"

"""`uniner pipeline`: how stages are wired together from one file."""

from __future__ import annotations

from uniner.pipeline import resolve


def test_each_stage_reads_the_output_it_needs(tmp_path):
    raw = {"workdir": str(tmp_path), "sample_corpus_docs": 10, "stages": ["passages", "annotate", "build-data", "train", "extract", "evaluate"],
           "extract": {"types": ["person"]}, "evaluate": {"data": ["dev.txt"]}}
    _, configs = resolve(raw, "in test")
    corpus, out = f"{tmp_path}/corpus", {name: f"{tmp_path}/{name}" for name in configs}
    assert configs["passages"].input == corpus and configs["annotate"].input == out["passages"]
    assert configs["build-data"].input == [out["annotate"]] and configs["train"].data == out["build-data"]
    # Extraction reads the documents, not the checkpoint; the model it runs is the one just trained.
    assert configs["extract"].input == corpus and configs["extract"].model == out["train"]
    assert configs["evaluate"].model == out["train"]


def test_settings_in_the_file_win_and_stages_may_be_left_out(tmp_path):
    raw = {"workdir": str(tmp_path), "stages": ["build-data", "train", "evaluate"],
           "build-data": {"input": "a.json"}, "evaluate": {"data": ["dev.txt"], "output": str(tmp_path / "report")}}
    _, configs = resolve(raw, "in test")
    assert configs["build-data"].input == ["a.json"] and configs["train"].data == f"{tmp_path}/build-data"
    assert configs["evaluate"].model == f"{tmp_path}/train" and configs["evaluate"].output == str(tmp_path / "report")


def test_a_stage_run_alone_reads_what_an_earlier_run_wrote(tmp_path):
    raw = {"workdir": str(tmp_path), "stages": ["annotate"], "passages": {"input": "docs/", "output": str(tmp_path / "p")}}
    _, configs = resolve(raw, "in test")
    assert list(configs) == ["annotate"] and configs["annotate"].input == str(tmp_path / "p")

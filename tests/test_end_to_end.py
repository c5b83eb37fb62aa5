"""The whole pipeline through the CLI, as the main job runs it but smaller (the recorded teacher, 12 documents), with
the document lake and the evaluation data on the local S3 server (the stages' outputs stay on local disk: checkpoints
on moto are slow)."""

from __future__ import annotations

import json

import boto3
import pyarrow.dataset as pads
import pytest
import yaml
from conftest import run_cli

from uniner import recorded, storage
from uniner.corpus import write_recorded_corpus

STAGES = ["passages", "annotate", "build-data", "train", "extract", "evaluate"]


@pytest.mark.timeout(2400)
def test_pipeline_end_to_end_on_s3(tmp_path, s3_bucket, s3_endpoint):
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(
        Bucket=bucket,
        Key="eval/news/dev.txt",
        Body=b"Maria\tB-person\nKeller\tI-person\nflew\tO\nto\tO\nBerlin\tB-location\n.\tO\n",
    )
    lake = f"{s3_bucket}/lake"
    write_recorded_corpus(lake, documents=12, s3_endpoint_url=s3_endpoint)
    workdir = str(tmp_path / "run")
    config = {
        "workdir": workdir,
        "s3_endpoint_url": s3_endpoint,
        "recorded_teacher": True,
        "stages": STAGES,
        "passages": {"input": lake, "id_field": "id", "max_tokens": 256, "sample_size": 12},
        "annotate": {"num_actors": 1, "cache": "off"},
        "train": {"max_steps": 2, "batch_size": 2, "max_length": 384, "cpus_per_worker": 1},
        "extract": {"types": ["person", "location"], "max_new_tokens": 24},
        "evaluate": {
            "data": [f"{s3_bucket}/eval/news/dev.txt"],
            "max_new_tokens": 24,
            "baseline": "smollm2-135m-instruct",
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))

    result = run_cli("pipeline", str(path), timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}: output in {workdir}/{stage}" in result.stdout

    location = storage.locate(workdir, s3_endpoint_url=s3_endpoint)
    annotations = pads.dataset(location.join("annotate").path, filesystem=location.fs, format="parquet").to_table()
    assert annotations.num_rows == 12 and set(annotations["teacher_model"].to_pylist()) == {recorded.TEACHER}
    assert set(annotations["status"].to_pylist()) == {"ok"}
    extractions = pads.dataset(location.join("extract").path, filesystem=location.fs, format="parquet").to_table()
    assert (
        sorted(extractions["doc_id"].to_pylist()) == sorted(set(extractions["doc_id"].to_pylist()))
        and extractions.num_rows == 12
    )
    report = json.loads(storage.read_text(location.join("evaluate", "report.json")))
    assert set(report["datasets"]) == {"news-dev"} and report["datasets"]["news-dev"]["n_queries"] == 2
    assert set(report["baseline"]["f1"]) == {"news-dev"} and report["baseline"]["subject"] == "smollm2-135m-instruct"
    assert "for the baseline smollm2-135m-instruct ->" in result.stdout
    # The terminal shows uniner's own lines: Ray's and vLLM's went to the files the last line names.
    assert "core_worker" not in result.stderr and "INFO streaming_executor" not in result.stderr
    assert "Ray's logs:" in result.stdout.splitlines()[-1]

    # Everything finished, so a rerun skips every stage.
    again = run_cli("pipeline", str(path), timeout=600)
    assert again.returncode == 0 and again.stderr.count("finished earlier") == len(STAGES), again.stderr[-2000:]

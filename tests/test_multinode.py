"""The pipeline across a Ray cluster of a head and two worker nodes (`ray.cluster_utils.Cluster`): a worker node dies
during annotation and another during extraction, and every passage and every document is still stored exactly once.

After the first loss a fresh node joins, as an autoscaler would bring one. Training runs on two workers, one per node.
The teacher is the fault server of test_annotate (with latency, so annotation is still running when the node dies)."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow.dataset as pads
import pytest
import yaml
from fault_server import SECRET, FaultServer

STAGES = ["passages", "annotate", "build-data", "train", "extract"]


class StageWatch(logging.Handler):
    """Sets an event when the pipeline logs that a stage starts."""

    def __init__(self):
        super().__init__()
        self.started = {stage: threading.Event() for stage in STAGES}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for stage, event in self.started.items():
            if message.startswith(f"pipeline: running {stage} "):
                event.set()


def _node_running(cluster_nodes, class_part: str, timeout: float = 180):
    """The cluster node that hosts a live actor whose class name contains `class_part` (from the GCS actor table:
    the state API would need the dashboard)."""
    from ray._private import state

    deadline = time.time() + timeout
    while time.time() < deadline:
        hosts = {
            a["Address"]["NodeID"]
            for a in state.actors().values()
            if a["State"] == "ALIVE" and class_part in a["ActorClassName"]
        }
        for node in cluster_nodes:
            if node.node_id in hosts:
                return node
        time.sleep(0.5)
    raise AssertionError(f"no live actor of {class_part} on a worker node within {timeout} s")


@pytest.mark.timeout(1200)
def test_pipeline_across_nodes_survives_losing_a_node_in_annotate_and_in_extract(tmp_path, tiny_model_dir, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from uniner import pipeline
    from uniner.session import init_ray

    monkeypatch.setenv("UNINER_TEST_KEY", SECRET)
    server = FaultServer(latency_s=0.5)
    workdir = tmp_path / "run"
    config = {
        "workdir": str(workdir),
        "sample_corpus_docs": 24,
        "stages": STAGES,
        "passages": {"tokenizer": str(tiny_model_dir), "max_tokens": 48, "id_field": "id"},
        "annotate": {
            "base_url": server.url,
            "model": "fault-teacher",
            "api_key_env": "UNINER_TEST_KEY",
            "num_actors": 2,
            "concurrency": 2,
            "batch_size": 2,
            "max_retries": 2,
            "timeout_s": 5.0,
            "requests_per_minute": 6000,
            "cache": str(tmp_path / "cache"),
        },
        "build-data": {"drop_entities_not_in_text": False},
        "train": {"model": str(tiny_model_dir), "num_workers": 2, "max_steps": 3, "batch_size": 2, "max_length": 128},
        "extract": {
            "types": ["person", "location", "date"],
            "backend": "transformers",
            "max_new_tokens": 24,
            "batch_size": 4,
            "replicas": 2,
            "passage_tokens": 48,
            "id_field": "id",
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome: dict = {}

    def run_pipeline():
        try:
            outcome["code"] = pipeline.run_file(str(path), overrides=[], dry_run=False)
        except BaseException as error:  # reported by the assertions below
            outcome["error"] = error

    runner = threading.Thread(target=run_pipeline)
    watch = StageWatch()
    logger = logging.getLogger("uniner")
    level = logger.level
    logger.setLevel(logging.INFO)  # the stage-start lines are INFO
    logger.addHandler(watch)
    ray.shutdown()
    # No CPU on the head: every task and actor lands on a worker node, and can be lost with it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    try:
        ray.init(address=cluster.address)
        runner.start()

        assert watch.started["annotate"].wait(300), outcome
        while sum(len(times) for times in server.requests.values()) < 8 and runner.is_alive():
            time.sleep(0.2)
        lost = _node_running(workers, "AnnotateBatch")
        assert runner.is_alive(), "annotation ended before a node could be removed: give it more work"
        cluster.remove_node(lost)
        workers.remove(lost)
        workers.append(cluster.add_node(num_cpus=2))  # the replacement an autoscaler would start

        assert watch.started["extract"].wait(600), outcome
        lost = _node_running(workers, "Engine")
        time.sleep(5)  # let the engines answer some batches first
        assert runner.is_alive(), "extraction ended before a node could be removed: give it more work"
        cluster.remove_node(lost)
        runner.join(timeout=600)
        assert outcome.get("code") == 0, outcome

        passages = pads.dataset(str(workdir / "passages"), format="parquet").to_table()
        annotations = pads.dataset(str(workdir / "annotate"), format="parquet").to_table()
        stored = annotations["passage_id"].to_pylist()
        assert len(stored) == len(set(stored)) and set(stored) == set(passages["passage_id"].to_pylist())
        assert set(annotations["status"].to_pylist()) == {"ok"}
        documents = pads.dataset(str(workdir / "corpus"), format="json").to_table()
        extracted = pads.dataset(str(workdir / "extract"), format="parquet").to_table()
        doc_ids = extracted["doc_id"].to_pylist()
        assert len(doc_ids) == len(set(doc_ids)) and set(doc_ids) == set(documents["id"].to_pylist())
        assert set(extracted["status"].to_pylist()) == {"ok"}
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
        server.stop()
        ray.shutdown()
        if runner.is_alive():
            runner.join(timeout=60)  # a failed check leaves the pipeline running; without Ray it stops
        cluster.shutdown()
        init_ray()  # later tests expect the session's embedded Ray

"""`ray job submit` to a real Ray cluster started with `ray start`, as docs/cluster.md tells users to do it.

A head with the dashboard (its job server) and token authentication, a second node that joins it, and
jobs/cluster-check.yaml submitted with `--working-dir .` and the teacher key in the runtime environment. The job is
stopped halfway with `ray job stop` and submitted again: it resumes, and every passage is stored exactly once. A job
without the key fails, and uniner's one-line reason is the last line of its log. The test stops only the Ray
processes it started (their own process groups), never the session's embedded Ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from fault_server import SECRET, FaultServer

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayCluster:
    """A head and one more node started by `ray start --block`, each in its own process group."""

    def __init__(self, folder: Path):
        # Token authentication, as docs/cluster.md sets it up: RAY_AUTH_MODE=token and the token on every node and
        # in every client (a head alone would turn it on when it finds a token; nodes and clients need the mode).
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.gcs_port, dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.log = folder / "ray-start.log"
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_nodes(folder, dashboard_port)
        except BaseException:
            self.stop()
            raise

    def _start_nodes(self, folder: Path, dashboard_port: int) -> None:
        self._start(
            "--head",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            str(folder / "ray"),
        )
        self._wait_for(lambda: self.job("list").returncode == 0, "the head's job server")
        self._start("--address", f"127.0.0.1:{self.gcs_port}")
        self._wait_for(lambda: self.nodes() == 2, "the second node")

    def _start(self, *args: str) -> None:
        with self.log.open("a") as log:
            self.processes.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--block",
                        "--num-cpus",
                        "1",
                        "--disable-usage-stats",
                        "--dashboard-agent-listen-port",
                        str(free_port()),
                        *args,
                    ],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def _wait_for(self, ready, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline or any(p.poll() is not None for p in self.processes):
                raise AssertionError(f"{what} did not come up: {self.log.read_text()[-3000:]}")
            time.sleep(1)

    def nodes(self) -> int:
        status = subprocess.run(
            [RAY, "status", "--address", f"127.0.0.1:{self.gcs_port}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def job(self, verb: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """One `ray job VERB` against the cluster, from the repository root, as a user types it."""
        return subprocess.run(
            [RAY, "job", verb, "--address", self.address, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *entrypoint: str, key: str | None = None) -> str:
        """`ray job submit --working-dir .` without waiting; returns the submission id."""
        runtime = ["--runtime-env-json", json.dumps({"env_vars": {"OPENAI_API_KEY": key}})] if key else []
        result = self.job("submit", "--no-wait", "--working-dir", ".", *runtime, "--", *entrypoint)
        assert result.returncode == 0, result.stdout + result.stderr
        assert key is None or key not in result.stdout + result.stderr
        return re.search(r"raysubmit_\w+", result.stdout + result.stderr).group(0)

    def status(self, job: str) -> str:
        """The job's state as `ray job status` words it."""
        result = self.job("status", job)
        said = result.stdout + result.stderr
        ended = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        found = re.search(r"Job '\w+' (succeeded|failed|was stopped)", said)
        if found:
            return ended[found.group(1)]
        found = re.search(r"Status for job '\w+': (\w+)", said)
        assert found, said[-2000:]
        return found.group(1)

    def wait(self, job: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while (state := self.status(job)) not in TERMINAL:
            assert time.time() < deadline, f"job {job} still {state} after {timeout} s: {self.logs(job)[-3000:]}"
            time.sleep(2)
        return state

    def logs(self, job: str) -> str:
        return self.job("logs", job).stdout

    def stop(self) -> None:
        for process in self.processes:  # `ray start --block` takes its node's processes down on SIGTERM
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + 10  # past it, a node that is still tidying up is killed: the folder goes anyway
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever of that group is left
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(builtin_model_dir):
    import ray

    from uniner.session import init_ray

    ray.shutdown()  # the session's embedded Ray and its idle workers would share the 2 cores with the cluster
    # A short folder: Ray's socket paths under it must stay within 107 bytes, which pytest's tmp paths can pass.
    folder = Path(tempfile.mkdtemp(prefix="uniner-ray-", dir="/tmp"))
    cluster = RayCluster(folder)
    yield cluster
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)
    init_ray()  # later tests expect the session's embedded Ray


def check_command(workdir: Path, teacher: FaultServer, cache: Path) -> list[str]:
    """The docs' command, pointed at the local teacher."""
    return [
        "uniner",
        "pipeline",
        "jobs/cluster-check.yaml",
        "--set",
        f"workdir={workdir}",
        "--set",
        f"annotate.base_url={teacher.url}",
        "--set",
        f"annotate.cache={cache}",
    ]


@pytest.mark.timeout(1200)
def test_a_job_stopped_halfway_resumes_when_submitted_again(cluster, tmp_path):
    teacher = FaultServer(api_key=SECRET, paced=True)  # 40 passages, answered as the test allows
    workdir = tmp_path / "check"
    command = check_command(workdir, teacher, tmp_path / "cache")

    unauthorised = cluster.job("list", env={"RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert unauthorised.returncode != 0  # the job server takes only the cluster's token

    first = cluster.submit(*command, key=SECRET)
    deadline = time.time() + 600
    # A few answers at a time until a part is stored: at most two blocks of 8 passages are in flight, so the job is
    # stopped with at most 16 of 40 passages answered, the rest waiting on the teacher.
    while not list((workdir / "annotate").glob("part-*.parquet")):
        assert cluster.status(first) not in TERMINAL, (
            f"the job ended before it could be stopped: {cluster.logs(first)[-3000:]}"
        )
        assert time.time() < deadline, cluster.logs(first)[-3000:]
        teacher.allow(2)
        time.sleep(0.5)
    stopped = cluster.job("stop", first)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert cluster.wait(first) == "STOPPED"
    teacher.unpace()  # the held requests are answered to no one: the job is gone
    time.sleep(2)
    passages = pads.dataset(str(workdir / "passages"), format="parquet").to_table()
    stored_first = set(pads.dataset(str(workdir / "annotate"), format="parquet").to_table()["text"].to_pylist())
    assert 0 < len(stored_first) < passages.num_rows
    asked_first = {text: teacher.count(text) for text in stored_first}

    second = cluster.submit(*command, key=SECRET)
    state = cluster.wait(second)
    logs = cluster.logs(second)
    assert state == "SUCCEEDED", logs[-3000:]
    annotations = pads.dataset(str(workdir / "annotate"), format="parquet").to_table()
    ids = annotations["passage_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(passages["passage_id"].to_pylist())
    assert set(annotations["status"].to_pylist()) == {"ok"}
    assert all(teacher.count(text) == asked_first[text] for text in stored_first)  # not asked again
    conversations = json.loads((workdir / "build-data" / "conversations.json").read_text())
    assert len(conversations) == passages.num_rows

    assert "pipeline: passages finished earlier" in logs and "uniner pipeline: done" in logs
    assert SECRET not in logs and cluster.token not in logs
    teacher.stop()


def test_a_failed_stage_fails_the_job_with_uniners_reason_last(cluster, tmp_path):
    teacher = FaultServer(api_key=SECRET)
    job = cluster.submit(*check_command(tmp_path / "check", teacher, tmp_path / "cache"))  # no key
    assert cluster.wait(job) == "FAILED"
    lines = [line for line in cluster.logs(job).splitlines() if line.strip()]
    assert lines[-1].startswith("uniner: error: the teacher endpoint") and "$OPENAI_API_KEY" in lines[-1], lines[-20:]
    teacher.stop()

"""`uniner annotate`: the answer parser, the filters, faults and resume against a local fault-injecting server,
the job-wide rate limit, and a happy path against a real vLLM OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from fault_server import SECRET, FaultServer
from pyarrow.fs import FileSelector

from uniner import storage
from uniner.annotate import ANNOTATION_SCHEMA, annotation_row, run
from uniner.config import AnnotateConfig
from uniner.errors import UserError
from uniner.teacher import Answer, RateLimiter
from uniner.teacher_answers import filter_pairs, parse_pairs

ROOT = Path(__file__).resolve().parents[1]


# ---- the parser ----


@pytest.mark.parametrize(
    "answer, pairs, problem",
    [
        ('[("Barack Obama", "person"), ("Paris", "city")]', [("Barack Obama", "person"), ("Paris", "city")], ""),
        ('[["Barack Obama", "person"], ["Paris", "city"]]', [("Barack Obama", "person"), ("Paris", "city")], ""),
        ("[('Paris', 'city'), ('Seine', 'river')]", [("Paris", "city"), ("Seine", "river")], ""),
        (
            """[("O'Brien", 'person'), ('the "Times"', "newspaper")]""",
            [("O'Brien", "person"), ('the "Times"', "newspaper")],
            "",
        ),
        ('```python\n[("Python", "programming language")]\n```', [("Python", "programming language")], ""),
        ('Sure! Here are the entities:\n[("IBM", "company")]\nLet me know if you need more.', [("IBM", "company")], ""),
        ('[("IBM", "company")]\n\nNote: [1] refers to the source.', [("IBM", "company")], ""),
        ('[("Alice", "person"), ("Bob", "person"), ("Lond', [("Alice", "person"), ("Bob", "person")], ""),
        ('[("Alice", "person"),\n ("Acme Corp", "compa', [("Alice", "person")], ""),
        ('[{"entity": "NASA", "type": "agency"}]', [("NASA", "agency")], ""),
        ('[("Tom [the cat]", "character")]', [("Tom [the cat]", "character")], ""),
        ("[]", [], ""),
        ('[("a", "b", "c"), ("d",)]', [], "the list holds no (entity, type) pairs"),
        ("There are no entities in this passage.", [], "no list in the answer"),
        ("[entity: Paris, type: city]", [], "neither JSON nor a Python literal"),
        ("", [], "no list in the answer"),
    ],
)
def test_parser_reads_what_teachers_send(answer, pairs, problem):
    parsed = parse_pairs(answer)
    assert parsed.pairs == pairs
    assert (problem in parsed.problem) if problem else parsed.problem == ""


def test_parser_marks_a_cut_off_list():
    assert parse_pairs('[("Alice", "person"), ("Lond').truncated
    assert not parse_pairs('[("Alice", "person")]').truncated


def test_filters_drop_else_types_and_non_english_and_flag_strings_not_in_the_passage():
    passage = "Alice met Bob in Paris."
    kept, dropped = filter_pairs(
        [
            ("Alice", "person"),
            ("Bob", "NA"),
            ("Paris", "misc"),
            ("Москва", "city"),
            ("Alice", "person"),
            ("Tokyo", "city"),
            ("  ", "thing"),
            ("Café Zoë", "place"),
            ("Bob", "Other"),
        ],
        passage,
    )
    assert kept == [
        {"text": "Alice", "type": "person", "in_passage": True},
        {"text": "Tokyo", "type": "city", "in_passage": False},
        {"text": "Café Zoë", "type": "place", "in_passage": False},
    ]
    assert [d["reason"] for d in dropped] == [
        "else-like type",
        "else-like type",
        "non-English entity",
        "duplicate",
        "empty entity",
        "else-like type",
    ]


@pytest.mark.parametrize(
    "answer, status",
    [
        (Answer(content='[("Alice", "person")]'), "ok"),
        (Answer(content="[]"), "ok"),
        (Answer(content="", refusal="I can't help with that."), "refused"),
        (Answer(content="", finish_reason="content_filter"), "refused"),
        (Answer(content="I'm sorry, but I cannot assist with that request."), "refused"),
        (Answer(content="The passage mentions Alice."), "malformed"),
        (Answer(error="InternalServerError 500: boom (after 7 attempts)"), "error"),
    ],
)
def test_every_answer_gets_a_status(answer, status):
    row = annotation_row("p1", "Alice sings.", answer, model="m", version="type-x")
    assert row["status"] == status
    assert (row["error"] != "") == (status != "ok")
    pa.Table.from_pylist([row], schema=ANNOTATION_SCHEMA)  # the row fits the contract


def test_rate_limiter_spaces_requests_and_tokens():
    now = time.time()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=60_000)  # 10 requests/s, 1000 tokens/s
    slots = [limiter.reserve(10) - now for _ in range(5)]
    assert slots[0] == pytest.approx(0, abs=0.01) and slots[4] == pytest.approx(0.4, abs=0.02)
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=60_000)
    slots = [limiter.reserve(500) - now for _ in range(3)]  # tokens bind: 0.5 s per request
    assert slots[2] == pytest.approx(1.0, abs=0.02)


# ---- a teacher that misbehaves on request (tests/fault_server.py) ----


def write_passages(folder: Path, texts: list[str]) -> str:
    """A passages table as `uniner passages` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "passage_id": f"p{i:04d}",
            "doc_id": f"d{i}",
            "text": text,
            "char_start": 0,
            "char_end": len(text),
            "n_tokens": len(text.split()),
            "source": "test",
        }
        for i, text in enumerate(texts)
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    return str(folder)


def read_output(folder) -> pa.Table:
    return pads.dataset(str(folder), format="parquet", schema=ANNOTATION_SCHEMA).to_table()


@pytest.fixture(scope="module")
def worker_env():
    """The fault server's key, for this process and the CLI's subprocesses (Ray workers import the driver's `uniner`
    on their own: uniner.session puts it first on their PYTHONPATH)."""
    os.environ["UNINER_TEST_KEY"] = SECRET
    yield
    os.environ.pop("UNINER_TEST_KEY", None)


def fault_config(server, passages, output, tmp_path, **overrides):
    values = dict(
        input=passages,
        output=str(output),
        base_url=server.url,
        model="fault-teacher",
        api_key_env="UNINER_TEST_KEY",
        max_retries=2,
        timeout_s=3.0,
        requests_per_minute=6000,
        num_actors=1,
        concurrency=8,
        batch_size=2,
        cache=str(tmp_path / "cache"),
        price_input_per_mtok=1.0,
        price_output_per_mtok=2.0,
    )
    values.update(overrides)
    return AnnotateConfig(**values)


def test_faults_retries_statuses_and_a_free_repeat(tmp_path, worker_env, ray_session):
    texts = [
        "RATELIMITED Alice went home.",
        "FLAKY Bob went out.",
        "SLOW Carol sat down.",
        "BROKEN Dan stood up.",
        "REFUSE Eve left.",
        "GARBLED Fay came.",
        "CUTOFF Gus ran off to Paris.",
        "LEAKY Hal sang.",
        "Ivy waved.",
        "Jon nodded.",
        "DROPPED Kay hummed.",
        "PROXY Lee smiled.",
    ]
    server = FaultServer()
    passages = write_passages(tmp_path / "passages", texts)
    config = fault_config(server, passages, tmp_path / "out", tmp_path)
    summary = run(config)

    table = read_output(tmp_path / "out")
    rows = {row["text"]: row for row in table.to_pylist()}
    assert sorted(table["passage_id"].to_pylist()) == [f"p{i:04d}" for i in range(len(texts))]
    status = {text.split()[0]: rows[text]["status"] for text in texts}
    assert status == {
        "RATELIMITED": "ok",
        "FLAKY": "ok",
        "SLOW": "ok",
        "BROKEN": "error",
        "REFUSE": "refused",
        "GARBLED": "malformed",
        "CUTOFF": "ok",
        "LEAKY": "error",
        "Ivy": "ok",
        "Jon": "ok",
        "DROPPED": "ok",
        "PROXY": "error",
    }
    counts = {text.split()[0]: server.count(text) for text in texts}
    assert counts == {
        "RATELIMITED": 2,
        "FLAKY": 2,
        "SLOW": 2,
        "BROKEN": 3,
        "REFUSE": 1,
        "GARBLED": 1,
        "CUTOFF": 1,
        "LEAKY": 1,
        "Ivy": 1,
        "Jon": 1,
        "DROPPED": 2,
        "PROXY": 1,
    }
    limited = server.requests["RATELIMITED Alice went home."]
    assert limited[1] - limited[0] >= 1.0  # Retry-After: 1 was honoured
    assert rows["Ivy waved."]["entities"] == [
        {"text": "Ivy", "type": "word", "in_passage": True},
        {"text": "Zanzibar", "type": "island", "in_passage": False},
    ]
    assert rows["Ivy waved."]["dropped_entities"] == [{"text": "it", "type": "none", "reason": "else-like type"}]
    assert rows["CUTOFF Gus ran off to Paris."]["entities"] == [
        {"text": "CUTOFF", "type": "signal", "in_passage": True}
    ]
    assert "cut off" in rows["CUTOFF Gus ran off to Paris."]["error"]
    assert "after 3 attempts" in rows["BROKEN Dan stood up."]["error"]
    assert SECRET not in rows["LEAKY Hal sang."]["error"] and "***" in rows["LEAKY Hal sang."]["error"]
    assert (
        "not a chat completion" in rows["PROXY Lee smiled."]["error"]
        and "Proxy login" in rows["PROXY Lee smiled."]["error"]
    )
    assert server.keys == {f"Bearer {SECRET}"}

    assert summary["passages_stored"] == 12 and summary["status"]["ok"] == 7
    assert summary["incomplete"].startswith("3 of 12 passages ended in error")
    assert summary["entities"] == 7 * 2 - 1 and summary["entities_not_in_passage"] == 6
    assert summary["this_run"]["requests"] == sum(counts.values()) and summary["this_run"]["answered_from_cache"] == 0
    assert summary["tokens"]["output"] == 9 * 12 and summary["cost_estimate_usd"] > 0
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert written["types"]["types"] == summary["types"]["types"] == 3  # word, island, signal

    # The same command again: only the passages stored as errors are asked again, each stored once.
    before = {t: server.count(t) for t in texts}
    again = run(config)
    asked = {t.split()[0]: server.count(t) - before[t] for t in texts if server.count(t) > before[t]}
    assert asked == {"BROKEN": 3, "LEAKY": 1, "PROXY": 1} and again["this_run"]["requests"] == 5
    stored = read_output(tmp_path / "out")["passage_id"].to_pylist()
    assert sorted(stored) == [f"p{i:04d}" for i in range(len(texts))]
    # --retry malformed: the malformed answer is asked again (from the cache: the question is the same), errors kept.
    before = {t: server.count(t) for t in texts}
    retried = run(fault_config(server, passages, tmp_path / "out", tmp_path, retry=["malformed"]))
    assert retried["this_run"]["answered_from_cache"] == 1 and retried["this_run"]["requests"] == 0
    assert {t: server.count(t) for t in texts} == before and read_output(tmp_path / "out").num_rows == 12

    # The same output with another teacher: one line that names the change and the fix.
    with pytest.raises(
        UserError, match="holds annotations made with other settings.*'fault-teacher' -> 'other'.*--overwrite"
    ):
        run(fault_config(server, passages, tmp_path / "out", tmp_path, model="other"))

    # A fresh output with the same settings: answers come from the cache; only the errors are asked again.
    fresh = run(fault_config(server, passages, tmp_path / "out2", tmp_path))
    assert sum(server.count(t) for t in texts) == sum(before.values()) + 3 + 1 + 1  # BROKEN: 3 attempts, LEAKY, PROXY
    assert fresh["this_run"]["answered_from_cache"] == 9 and fresh["this_run"]["cost_estimate_usd"] == 0
    for path in [*(tmp_path / "out").rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    server.stop()


def test_rate_limit_holds_for_the_whole_job_with_output_and_cache_on_s3(
    tmp_path, worker_env, ray_session, s3_bucket, s3_endpoint
):
    server = FaultServer()
    texts = [f"Word{i} is here." for i in range(16)]
    rpm = 300  # 5 requests per second over two actors
    config = fault_config(
        server,
        write_passages(tmp_path / "passages", texts),
        f"{s3_bucket}/out",
        tmp_path,
        requests_per_minute=rpm,
        num_actors=2,
        cache=f"{s3_bucket}/cache",
        s3_endpoint_url=s3_endpoint,
        timeout_s=30.0,
    )  # no timeouts on a busy machine: every request is counted once
    summary = run(config)
    assert summary["status"] == {"ok": 16} and summary["passages_stored"] == 16
    bucket = storage.locate(s3_bucket, s3_endpoint_url=s3_endpoint)
    names = [info.path for info in bucket.fs.get_file_info(FileSelector(bucket.path, recursive=True)) if info.is_file]
    assert sum("/cache/" in n for n in names) == 16 and any(n.endswith("/out/_summary.json") for n in names)
    assert any("/out/part-" in n for n in names)
    times = server.times()
    assert len(times) == 16
    # Requests leave 60/rpm = 0.2 s apart. Client-side latency can only delay a request after its slot (by up to
    # `late` s on a busy machine: a full suite on 2 cores has delayed one by over 0.5 s), so a window of w seconds
    # holds at most (w + late) * rpm/60 + 1 of them. A limiter per actor instead of one for the job would still fail
    # the last line: requests 0.1 s apart on average.
    late = 0.75
    for window_s in (1.0, 2.0):
        busiest = max(sum(1 for t in times if start <= t < start + window_s) for start in times)
        assert busiest <= (window_s + late) * rpm / 60 + 1, (window_s, busiest, times)
    assert (times[-1] - times[0]) / 15 >= 60 / rpm - late / 15
    server.stop()


def test_kill_halfway_then_rerun_stores_every_passage_once(tmp_path, worker_env, ray_session):
    server = FaultServer(latency_s=0.3)
    texts = [f"Name{i} walked to the market." for i in range(40)]
    passages = write_passages(tmp_path / "passages", texts)
    output = tmp_path / "out"
    args = [
        "annotate",
        "--input",
        passages,
        "--output",
        str(output),
        "--base-url",
        server.url,
        "--model",
        "fault-teacher",
        "--api-key-env",
        "UNINER_TEST_KEY",
        "--num-actors",
        "1",
        "--concurrency",
        "2",
        "--batch-size",
        "2",
        "--requests-per-minute",
        "600",
        "--cache",
        "off",
    ]
    job = subprocess.Popen(
        [sys.executable, "-m", "uniner", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 600  # a fresh Ray and its actor start slowly on a loaded machine
    while time.time() < deadline and len(list(output.glob("part-*.parquet"))) < 3 and job.poll() is None:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before it could be killed: " + job.stdout.read()[-2000:]
    os.killpg(job.pid, signal.SIGKILL)  # the job's own process group: the driver and the Ray it started
    job.wait()
    time.sleep(2)  # let any request still on the wire finish
    stored_first = set(read_output(output)["text"].to_pylist())
    assert 0 < len(stored_first) < len(texts)
    counts_first = {t: server.count(t) for t in texts}

    printed = job.stdout.read()
    assert "annotate:" in printed and SECRET not in printed

    # The same command again (in this process, to spare a second Ray start): it resumes.
    config = fault_config(
        server,
        passages,
        output,
        tmp_path,
        num_actors=1,
        concurrency=2,
        batch_size=2,
        requests_per_minute=600,
        cache="off",
        max_retries=6,
        timeout_s=60.0,
        price_input_per_mtok=0.0,
        price_output_per_mtok=0.0,
    )
    summary = run(config)
    table = read_output(output)
    assert sorted(table["text"].to_pylist()) == sorted(texts) and set(table["status"].to_pylist()) == {"ok"}
    for text in stored_first:
        assert server.count(text) == counts_first[text], text  # not asked again
    assert summary["stored_before_this_run"] == len(stored_first)
    assert summary["this_run"]["requests"] == len(texts) - len(stored_first)  # no retries: the server never fails
    server.stop()


def test_dry_run_estimates_without_a_request(tmp_path):
    server = FaultServer()
    passages = write_passages(tmp_path / "passages", ["Alice met Bob in Paris. " * 10] * 3)
    result = run_cli(
        "annotate",
        "--input",
        passages,
        "--output",
        str(tmp_path / "out"),
        "--base-url",
        server.url,
        "--price-input-per-mtok",
        "1000",
        "--max-tokens",
        "100",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "annotate 3 of 3 passages" in result.stdout and "estimated input tokens (chars/4 rule)" in result.stdout
    assert "estimated cost: $0." in result.stdout and server.times() == []
    assert not (tmp_path / "out").exists()
    server.stop()


def test_a_refused_key_stops_the_job_with_one_line(tmp_path, worker_env, ray_session):
    server = FaultServer()
    passages = write_passages(tmp_path / "passages", ["UNAUTHORIZED Kim is here."])
    with pytest.raises(UserError) as caught:
        run(fault_config(server, passages, tmp_path / "out", tmp_path))
    error = caught.value
    assert "\n" not in str(error)
    assert read_output(tmp_path / "out").num_rows == 0  # nothing stored: a rerun with the right key asks again
    assert "refused the request (AuthenticationError 401" in str(error) and "$UNINER_TEST_KEY" in str(error)
    assert SECRET not in str(error)
    server.stop()


# ---- a real OpenAI-compatible server: vLLM serving the built-in model ----


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def vllm_launch(request, builtin_model_dir, tmp_path_factory):
    """Starts the vLLM server when this module begins (if its test is selected), so its 1-2 minutes of engine start
    overlap the fault tests, which mostly wait; `vllm_server` waits for it. Stops only that process group."""
    if not any(item.name.startswith("test_happy_path_against_vllm") for item in request.session.items):
        yield None
        return
    from uniner.models import vllm_socket_folder

    port = _free_port()
    log_file = tmp_path_factory.mktemp("vllm") / "server.log"
    # Its sockets in a folder of their own, removed after: vLLM leaves them in the temp dir.
    sockets = vllm_socket_folder()
    private = {"VLLM_RPC_BASE_PATH": sockets} if sockets else {}
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(builtin_model_dir),
                "--served-model-name",
                "smol-teacher",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-model-len",
                "1024",
                "--dtype",
                "float32",
                "--enforce-eager",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **private},
            start_new_session=True,
        )
    yield server, port, log_file
    os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: its engine process goes with it
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    if sockets:
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
def vllm_server(vllm_launch):
    server, port, log_file = vllm_launch
    deadline = time.time() + 300
    while True:
        if server.poll() is not None:
            pytest.fail(f"the vLLM server exited with {server.returncode}: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"the vLLM server did not become healthy in 300 s: {log_file.read_text()[-2000:]}")
        time.sleep(1)


def test_happy_path_against_vllm(tmp_path, vllm_server, worker_env, ray_session, caplog):
    texts = [
        "Barack Obama was born in Hawaii and served as president of the United States.",
        "Apple released the iPhone in San Francisco in 2007.",
        "Marie Curie won the Nobel Prize in Physics in 1903.",
    ]
    passages = write_passages(tmp_path / "passages", texts)
    config = AnnotateConfig(
        input=passages,
        output=str(tmp_path / "out"),
        base_url=vllm_server,
        model="smol-teacher",
        api_key_env="UNINER_NO_SUCH_KEY",
        max_tokens=48,
        cache="off",
        num_actors=1,
        price_input_per_mtok=0.5,
        price_output_per_mtok=1.5,
    )
    with caplog.at_level("INFO", logger="uniner"):
        summary = run(config)
    assert "placeholder key" in caplog.text
    table = read_output(tmp_path / "out")
    assert sorted(table["text"].to_pylist()) == sorted(texts)
    assert set(table["status"].to_pylist()) <= {"ok", "malformed", "refused"}
    assert all(table["input_tokens"].to_pylist()) and all(0 < n <= 48 for n in table["output_tokens"].to_pylist())
    assert all(raw for raw in table["raw_response"].to_pylist())
    assert set(table["teacher_model"].to_pylist()) == {"smol-teacher"}
    assert summary["passages_stored"] == 3 and summary["this_run"]["requests"] == 3
    assert summary["cost_estimate_usd"] > 0


def test_an_unreachable_teacher_stops_the_run_after_the_first_retries(tmp_path, worker_env, ray_session):
    with socket.socket() as probe:  # a port with nothing behind it
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    passages = write_passages(tmp_path / "passages", [f"Name{i} walked home." for i in range(30)])
    config = AnnotateConfig(
        input=passages,
        output=str(tmp_path / "out"),
        base_url=url,
        model="m",
        max_retries=2,
        concurrency=2,
        num_actors=1,
        batch_size=2,
        cache="off",
    )
    with pytest.raises(
        UserError,
        match=rf"the teacher endpoint {url} cannot be reached \(APIConnectionError.*after 3 "
        r"attempts\)\): check --base-url and that the server is up",
    ):
        run(config)
    assert read_output(tmp_path / "out").num_rows == 0  # no passage was stored as an error


def test_a_run_with_errors_exits_3_and_a_rerun_asks_only_for_those(tmp_path, worker_env):
    server = FaultServer()
    passages = write_passages(tmp_path / "passages", ["BROKEN Dan stood up.", "Ivy waved."])
    args = [
        "annotate",
        "--input",
        passages,
        "--output",
        str(tmp_path / "out"),
        "--base-url",
        server.url,
        "--api-key-env",
        "UNINER_TEST_KEY",
        "--max-retries",
        "0",
        "--cache",
        "off",
    ]
    result = run_cli(*args)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "uniner annotate: incomplete" in result.stdout and "error 1" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("uniner: error: annotate: 1 of 2 passages ended in error (first: InternalServerError 503")
    assert "run the same command again" in last
    assert "a passage ended in error" in result.stderr  # said as it happened, not only at the end
    assert (server.count("BROKEN Dan stood up."), server.count("Ivy waved.")) == (1, 1)
    assert run_cli(*args).returncode == 3
    assert (server.count("BROKEN Dan stood up."), server.count("Ivy waved.")) == (2, 1)
    server.stop()


def test_the_recorded_teacher_replays_real_answers_through_the_stage(tmp_path, worker_env, ray_session):
    from uniner.recorded import TEACHER, recorded_passages, recorded_teacher

    recording = recorded_passages()
    assert len(recording) == 300 and all(r["entities"] for r in recording)
    first, second = recording[0], recording[1]
    cut = first["text"][: len(first["text"]) // 2]  # the passages stage may cut a recorded passage in two
    passages = write_passages(tmp_path / "passages", [first["text"], cut, second["text"], "A passage nobody recorded."])
    with recorded_teacher() as url:
        summary = run(
            AnnotateConfig(
                input=passages,
                output=str(tmp_path / "out"),
                base_url=url,
                model=TEACHER,
                cache="off",
                num_actors=1,
                batch_size=2,
            )
        )
    rows = {row["text"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert [(e["text"], e["type"]) for e in rows[first["text"]]["entities"]] == [tuple(p) for p in first["entities"]]
    assert {e["text"] for e in rows[cut]["entities"]} == {e for e, _ in first["entities"] if e in cut}
    assert rows["A passage nobody recorded."]["status"] == "refused"
    assert "no answer for this passage" in rows["A passage nobody recorded."]["raw_response"]
    assert summary["teacher_model"] == TEACHER == rows[second["text"]]["teacher_model"]

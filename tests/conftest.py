"""Shared fixtures: a local S3 server (moto), one embedded Ray for the session, the built-in model, shared data."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

# Credentials for the local S3 server only; set before boto3 or Ray start so that every process sees them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ.pop("RAY_ADDRESS", None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# What makes a test slow on 2 cores: a Ray cluster, a vLLM engine or training. `pytest -m "not slow"` runs the rest.
SLOW_FIXTURES = {
    "ray_session",
    "worker_env",
    "cluster",
    "vllm_server",
    "vllm_launch",
    "vllm_run",
    "transformers_run",
    "killed_and_resumed",
}
SLOW_FILES = {"test_end_to_end.py", "test_multinode.py", "test_ray_job.py"}


# The files that take longest, longest first: pytest-xdist hands out whole files in collection order, so starting
# these first keeps the two processes busy to the end instead of leaving one running a long file alone.
LONGEST_FILES = [
    "test_end_to_end.py",
    "test_multinode.py",
    "test_ray_job.py",
    "test_extract.py",
    "test_annotate.py",
    "test_train.py",
    "test_models.py",
    "test_passages.py",
]


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the local S3 server; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for every test that needs it."""
    import ray

    from uniner.session import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def builtin_model_dir():
    """The built-in model folder (fetched and converted into the user cache on first use)."""
    from uniner.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(builtin_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}: place ../shared/data beside the project")
    return SHARED_DATA


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `uniner` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "uniner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_model_dir):
    """A randomly initialised two-layer Llama with the built-in tokenizer: a real model folder that moves fast."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

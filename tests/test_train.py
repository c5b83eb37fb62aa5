"""`uniner train`: the template and loss mask token for token, length grouping, and real Ray Train runs on a tiny
model (2 workers over gloo): loss falls, a worker killed mid-run resumes from its checkpoint, the output loads in
transformers, checkpoints and data on S3."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uniner import storage, train
from uniner.config import TrainConfig
from uniner.formats import READ_ACK, Template, question, text_turn
from uniner.train_data import (
    IGNORE_INDEX,
    ConversationTokenizer,
    TooLong,
    collate,
    conversation_rng,
    micro_batches,
    shuffled_turns,
    tokenized_conversations,
)

TYPES = ["person", "city", "company", "river", "year", "sport"]


def _turns(conversation: dict) -> list[tuple[str, str]]:
    return [(turn["from"], turn["value"]) for turn in conversation["conversations"]]


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """Small conversations with a fixed answer pattern a tiny model can learn."""
    rng = random.Random(seed)
    names = ["Ada", "Bob", "Lyon", "Oslo", "Acme", "Nile", "1990", "golf"]
    conversations = []
    for index in range(n):
        picked = rng.sample(names, 3)
        turns = [{"from": "human", "value": text_turn(" ".join(picked) + " met.")}, {"from": "gpt", "value": READ_ACK}]
        for entity_type in rng.sample(TYPES, 2):
            turns += [
                {"from": "human", "value": question(entity_type)},
                {"from": "gpt", "value": json.dumps(picked[:1])},
            ]
        conversations.append({"id": f"c{index}", "conversations": turns})
    return conversations


# ---- tokenization and the loss mask ----


def test_unmasked_tokens_are_exactly_the_answers_and_prompts_match_inference(tokenizer, shared_data):
    sample = json.loads((shared_data / "pile-ner-sample" / "pile_ner_type_sample.json").read_text())
    conversation = next(
        c for c in sample if len(c["conversations"]) >= 6 and len(c["conversations"][0]["value"]) < 1500
    )
    turns = shuffled_turns(_turns(conversation), conversation_rng(0, conversation["id"]))
    tokens = ConversationTokenizer(tokenizer, max_length=1024)(turns)
    assert tokens.turns_cut == 0 and len(tokens.input_ids) == len(tokens.loss_mask)

    answers = [value for role, value in turns if role == "gpt"]
    expected = [t for a in answers for t in tokenizer(f" {a}{tokenizer.eos_token}", add_special_tokens=False).input_ids]
    unmasked = [t for t, m in zip(tokens.input_ids, tokens.loss_mask) if m]
    assert unmasked == expected
    assert tokenizer.decode(unmasked) == "".join(f" {a}{tokenizer.eos_token}" for a in answers)

    # Every answer starts right after `ASSISTANT:`; the tokens before it are the whole prompt so far tokenized as
    # inference will tokenize it, the first question's exactly `Template.query`.
    template = Template(eos=tokenizer.eos_token)
    starts = [i for i in range(1, len(tokens.loss_mask)) if tokens.loss_mask[i] and not tokens.loss_mask[i - 1]]
    assert len(starts) == len(answers)
    for index, start in enumerate(starts):
        assert tokens.input_ids[:start] == tokenizer(template.render(turns[: 2 * index + 1])).input_ids
    text, first_type = (
        turns[0][1].removeprefix("Text: "),
        turns[2][1].removeprefix("What describes ").removesuffix(" in the text?"),
    )
    assert tokens.input_ids[: starts[1]] == tokenizer(template.query(text, first_type)).input_ids


def test_turns_after_the_first_exchange_are_shuffled_in_pairs_with_a_seed():
    turns = [("human", "Text: t"), ("gpt", READ_ACK)] + [
        x for i in range(6) for x in (("human", f"q{i}"), ("gpt", f"a{i}"))
    ]
    orders = {tuple(shuffled_turns(turns, conversation_rng(seed, "c"))) for seed in range(5)}
    assert len(orders) > 1
    assert shuffled_turns(turns, conversation_rng(3, "c")) == shuffled_turns(turns, conversation_rng(3, "c"))
    for order in orders:
        assert order[:2] == tuple(turns[:2])
        assert all(q[1][1:] == a[1][1:] for q, a in zip(order[2::2], order[3::2]))  # q3 stays with a3


def test_long_conversations_are_cut_at_a_turn_boundary(tokenizer):
    turns = [("human", "Text: Ada met Bob in Oslo."), ("gpt", READ_ACK)]
    turns += [x for t in TYPES for x in (("human", question(t)), ("gpt", '["Ada"]'))]
    full = ConversationTokenizer(tokenizer, max_length=1024)(turns)
    cut = ConversationTokenizer(tokenizer, max_length=len(full.input_ids) - 1)(turns)
    assert cut.turns_cut == 1 and cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.input_ids[-1] == tokenizer.eos_token_id and cut.loss_mask[-1] == 1
    with pytest.raises(TooLong):
        ConversationTokenizer(tokenizer, max_length=20)(turns)


def test_tokenized_conversations_keep_order_leave_out_the_too_long_and_name_a_malformed_one(tokenizer):
    def record(text: str) -> dict:
        return {"conversations": [{"from": "human", "value": f"Text: {text}"}, {"from": "gpt", "value": READ_ACK}]}

    short, long = record("Ada met Bob."), record("Ada met Bob in Oslo. " * 40)
    kept = tokenized_conversations([short, long, short], tokenizer, max_length=64)
    assert [t.input_ids for t in kept] == [ConversationTokenizer(tokenizer, max_length=64)(_turns(short)).input_ids] * 2
    with pytest.raises(ValueError, match="conversation 1 of the list is not a UniNER conversation"):
        tokenized_conversations([short, {"conversations": "Ada"}], tokenizer, max_length=64)


def test_length_grouped_batches_keep_every_row_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, size=256)
    window = {"input_ids": [np.arange(n) + 1 for n in lengths], "loss_mask": [np.ones(n, np.int8) for n in lengths]}
    batches = list(micro_batches([window], batch_size=4, rng=random.Random(0), pad_id=0))
    assert sorted(int(b["attention_mask"].sum(1)[i]) for b in batches for i in range(len(b["input_ids"]))) == sorted(
        lengths
    )
    share = sum(b["attention_mask"].sum() for b in batches) / sum(b["attention_mask"].size for b in batches)
    assert share > 0.97
    batch = collate([(np.array([5, 6, 7]), np.array([0, 1, 1]))], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7]]


def test_answer_loss_equals_the_full_logits_loss_and_its_gradient(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [(np.arange(3, 3 + n), np.array([0] * (n - k) + [1] * k, np.int8)) for n, k in [(12, 4), (7, 2), (9, 0)]]
    batch = collate(rows, pad_id=0)
    items = torch.tensor(6.0)
    inputs = {name: torch.from_numpy(value) for name, value in batch.items()}
    full = model(**inputs, num_items_in_batch=items, use_cache=False).loss
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    kept = train.answer_loss(model, batch, device=torch.device("cpu"), items=items)
    kept.backward()
    assert torch.allclose(kept, full, atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))


def test_widths_rounded_up_to_a_multiple_leave_the_loss_and_gradients_as_they_were(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [(np.arange(3, 3 + n), np.array([0] * (n - k) + [1] * k, np.int8)) for n, k in [(12, 4), (7, 2), (9, 1)]]
    items = torch.tensor(7.0)
    runs = []
    for multiple in (1, 16):
        batch = collate(rows, pad_id=0, pad_to_multiple=multiple)
        model.zero_grad()
        loss = train.answer_loss(model, batch, device=torch.device("cpu"), items=items)
        loss.backward()
        runs.append((batch, loss, [p.grad.clone() for p in model.parameters()]))
    (narrow, loss, grads), (wide, wide_loss, wide_grads) = runs
    assert narrow["input_ids"].shape == (3, 12) and wide["input_ids"].shape == (3, 16)
    assert wide["attention_mask"][:, 12:].sum() == 0 and (wide["labels"][:, 12:] == IGNORE_INDEX).all()
    assert torch.allclose(loss, wide_loss, atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(grads, wide_grads))


# ---- Ray Train runs ----


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_model_dir, ray_session, s3_endpoint):
    """One run on 2 workers, checkpoints on the local S3 server, whose last worker dies after step 3; FailureConfig
    restarts the group from the step-2 checkpoint. Yields the summary, a local copy of the output and the marker."""
    import uuid

    import boto3

    folder = tmp_path_factory.mktemp("train")
    conversations = synthetic_conversations(16)
    conversations.append(
        {
            "id": "long",
            "conversations": [{"from": "human", "value": text_turn("word " * 400)}, {"from": "gpt", "value": READ_ACK}],
        }
    )
    conversations.append({"id": "broken", "conversations": [{"from": "gpt", "value": "[]"}]})
    (folder / "train.json").write_text(json.dumps(conversations))
    bucket = f"train-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    marker = folder / "killed"
    config = TrainConfig(
        data=str(folder / "train.json"),
        output=f"s3://{bucket}/student",
        model=str(tiny_model_dir),
        num_workers=2,
        batch_size=4,
        max_steps=8,
        learning_rate=1e-2,
        warmup_ratio=0.1,
        max_length=128,
        checkpoint_every=2,
        s3_endpoint_url=s3_endpoint,
    )
    summary = train.run(config, after_step=kill_last_worker_once(at_step=3, marker=str(marker)))
    storage.download_tree(storage.locate(config.output, s3_endpoint_url=s3_endpoint), str(folder / "out"))
    return summary, folder / "out", marker


def kill_last_worker_once(*, at_step: int, marker: str):
    """A training hook: the last worker exits at step `at_step`, once (while `marker` does not exist). A closure, so
    that Ray pickles it by value into the workers."""

    def after_step(*, step: int, rank: int, world_size: int) -> None:
        import os
        import pathlib
        import time

        if step == at_step and rank == world_size - 1 and not os.path.exists(marker):
            pathlib.Path(marker).touch()
            # The controller takes the workers' reports on its own schedule: wait past it, so that the crash comes
            # after the last checkpoint is registered, as a crash in a real run would.
            time.sleep(10)
            os._exit(1)

    return after_step


def test_loss_falls_on_a_small_fixed_set(killed_and_resumed):
    summary, out, _ = killed_and_resumed
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0  # an untrained model stays near ln(vocab) = 10.8
    assert summary["final_loss"] == metrics[-1]["loss"] and summary["steps"] == 8
    assert all(m["tokens_per_s"] > 0 for m in metrics) and all(m["lr"] > 0 for m in metrics[1:])  # warmup starts at 0
    assert all(0 <= m["data_seconds"] <= m["seconds"] for m in metrics)


def test_a_killed_worker_resumes_from_the_last_checkpoint(killed_and_resumed):
    summary, out, marker = killed_and_resumed
    assert marker.exists()  # the worker really died once
    assert summary["resumed_from_steps"] == [2]
    on_disk = json.loads((out / "_summary.json").read_text())
    assert on_disk["resumed_from_steps"] == [2] and on_disk["steps_per_epoch"] == 2


def test_a_finished_run_leaves_its_weights_and_deletes_its_checkpoints(killed_and_resumed):
    """The run resumed from a checkpoint in S3 (the test above); once its weights are in the output, the checkpoints
    (weights and optimizer state, three times the model) are gone from the bucket."""
    summary, out, _ = killed_and_resumed
    assert (out / "model.safetensors").is_file() and (out / "_summary.json").is_file()
    assert not (out / train.RAY_DIR).exists(), sorted(p.name for p in (out / train.RAY_DIR).rglob("*"))[:5]


def test_rejected_conversations_land_in_rejects_with_their_reason(killed_and_resumed):
    summary, out, _ = killed_and_resumed
    rejects = pq.read_table(out / "_rejects").to_pylist()
    assert {(r["id"], r["reason"]) for r in rejects} == {("long", "too_long"), ("broken", "malformed")}
    assert summary["conversations_trainable"] == 16 and summary["rejected"] == {"malformed": 1, "too_long": 1}


def test_output_is_a_plain_hugging_face_folder(killed_and_resumed, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = killed_and_resumed
    model = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not torch.equal(
        model.state_dict()["model.embed_tokens.weight"], initial.state_dict()["model.embed_tokens.weight"]
    )
    assert AutoTokenizer.from_pretrained(out).eos_token == AutoTokenizer.from_pretrained(tiny_model_dir).eos_token


def test_finished_output_is_not_overwritten_silently(killed_and_resumed):
    from uniner.errors import UserError

    summary, _, _ = killed_and_resumed
    config = TrainConfig(
        data=summary["data"],
        output=summary["output"],
        model=summary["model"],
        s3_endpoint_url=summary["config"]["s3_endpoint_url"],
    )
    with pytest.raises(UserError, match="--overwrite"):
        train.run(config)


def test_no_ray_train_helper_that_cannot_work_runs_on_the_embedded_ray(killed_and_resumed):
    """The placement-group cleaner needs the State API, which the embedded Ray lacks; no autoscaler drains its one
    node, so there is nothing for the preemption watcher to see. The run above used the session's embedded Ray."""
    import ray._private.state  # the GCS actor table: the public State API needs the dashboard

    started = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
    assert "TrainController" in started and "RayTrainWorker" in started
    assert not started & {"PlacementGroupCleaner", "PreemptionWatcher"}


@pytest.mark.slow
def test_a_run_logs_each_step_once_and_nothing_every_second(tmp_path, tiny_model_dir):
    """Each step's line once (Ray Train's print() writes it twice), and none of the lines that Ray's helpers would
    repeat every second: the placement-group cleaner's State API warning and the data split's progress bar."""
    from conftest import run_cli

    (tmp_path / "train.json").write_text(json.dumps(synthetic_conversations(16)))
    result = run_cli(
        "train",
        "--data",
        str(tmp_path / "train.json"),
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(tiny_model_dir),
        "--max-steps",
        "4",
        "--max-length",
        "128",
        "--checkpoint-every",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    steps = [
        line.split("uniner train: step ")[1].split()[0] for line in log.splitlines() if "uniner train: step " in line
    ]
    assert steps == ["1/4", "2/4", "3/4", "4/4"]
    assert "State API" not in log and "Running Dataset train" not in log


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_jsonl_and_parquet_conversations_are_read(suffix, tmp_path, ray_session):
    conversations = synthetic_conversations(3)
    path = tmp_path / f"part-0.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    else:
        pq.write_table(pa.Table.from_pylist(conversations), path)
    rows = train.read_conversations(train.data_files(TrainConfig(data=str(tmp_path), output="unused"))).take_all()
    assert [_turns(row) for row in rows] == [_turns(c) for c in conversations]


def test_job_files_load_and_hold_the_paper_settings():
    from uniner.config import load_config

    paper = load_config(TrainConfig, yaml_path="jobs/train-paper.yaml", overrides={"data": "d", "output": "o"})
    assert paper.num_workers * paper.batch_size * paper.grad_accum == 256
    assert (paper.learning_rate, paper.lr_schedule, paper.warmup_ratio, paper.epochs, paper.max_length) == (
        2e-5,
        "cosine",
        0.04,
        3,
        1024,
    )
    assert paper.precision == "bf16" and paper.fsdp and paper.use_gpu
    cpu = load_config(TrainConfig, yaml_path="jobs/train-cpu.yaml", overrides={"data": "d", "output": "o"})
    assert not cpu.use_gpu and cpu.precision == "fp32"


def test_dry_run_plans_without_training(tmp_path):
    from conftest import run_cli

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in synthetic_conversations(2)))
    result = run_cli(
        "train",
        "--config",
        "jobs/train-cpu.yaml",
        "--data",
        str(tmp_path / "train.jsonl"),
        "--output",
        str(tmp_path / "o"),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "32 conversations per step" in result.stdout and "DDP, fp32" in result.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("problem", ["bad line", "wrong shape", "missing"])
def test_bad_training_data_is_one_line_naming_the_file_and_line_before_ray_starts(tmp_path, problem):
    from conftest import run_cli

    data = tmp_path / "conv.jsonl"
    good = [json.dumps(c) for c in synthetic_conversations(3)]
    if problem == "bad line":
        data.write_text("\n".join([good[0], good[1][:30], good[2]]) + "\n")
        expected = f"{data}:2: not valid JSON"
    elif problem == "wrong shape":
        data.write_text("\n".join([good[0], good[1], json.dumps({"id": "x", "text": "Ada met Bob."})]) + "\n")
        expected = f"{data}:3: expected"
    else:
        expected = "does not exist"
    result = run_cli("train", "--data", str(data), "--output", str(tmp_path / "o"), "--max-steps", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("uniner: error: ") and expected in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr and len(lines) <= 2
    assert not (tmp_path / "o").exists()


def test_a_run_whose_checkpoints_cannot_fit_on_the_disk_is_refused_before_ray_starts(
    tmp_path, tiny_model_dir, monkeypatch
):
    import shutil

    from transformers import AutoModelForCausalLM

    from uniner.errors import UserError

    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in synthetic_conversations(3)))
    config = TrainConfig(data=str(data), output=str(tmp_path / "o"), model=str(tiny_model_dir), epochs=1)
    needed = train.disk_needed(config, train.weight_count(tiny_model_dir))
    # three checkpoints of fp32 weights and Adam's two moments (2 kept, 1 being written), then the fp32 weights
    weights = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert needed == (3 * 12 + 4) * weights
    # 8 steps with a checkpoint every 4 write two (at step 4 and at the end); one step, one
    assert train.disk_needed(TrainConfig(max_steps=8, checkpoint_every=4), weights) == (2 * 12 + 4) * weights
    assert train.disk_needed(TrainConfig(max_steps=1, checkpoint_every=4), weights) == (1 * 12 + 4) * weights
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * needed, 0, needed - 1))
    with pytest.raises(UserError, match=r"GB free; this run writes up to .*lower --keep-checkpoints"):
        train.run(config)
    assert not any((tmp_path / "o").iterdir())


def test_the_temp_dir_where_checkpoints_are_first_written_counts(tmp_path, tiny_model_dir, monkeypatch):
    import os
    import shutil
    import tempfile

    from uniner import storage
    from uniner.errors import UserError

    output = storage.locate(str(tmp_path / "o"))
    (tmp_path / "o").mkdir()
    config = TrainConfig(output=output.uri, model=str(tiny_model_dir), epochs=1)
    weights = train.weight_count(tiny_model_dir)
    needed, one = train.disk_needed(config, weights), train.checkpoint_bytes(config, weights)
    free = {}
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, free[str(path)]))
    # On the output's disk: room for what the output holds is not enough, one more checkpoint is written first.
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    free[output.path] = needed
    with pytest.raises(UserError, match=r"and each checkpoint first in the temp dir"):
        train.check_disk_space(output, config, tiny_model_dir)
    free[output.path] = needed + one
    train.check_disk_space(output, config, tiny_model_dir)
    # On a disk of its own: it needs room for one checkpoint.
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to put the temp dir on")
    monkeypatch.setattr(tempfile, "tempdir", "/dev/shm")
    free[output.path], free["/dev/shm"] = needed, one - 1
    with pytest.raises(UserError, match=r"the temp dir /dev/shm has .* set TMPDIR to a folder on a larger disk"):
        train.check_disk_space(output, config, tiny_model_dir)
    free["/dev/shm"] = one
    train.check_disk_space(output, config, tiny_model_dir)

"""Stage 2, `uniner annotate`: passages -> (entity, type) labels from a teacher LLM, on Ray Data with async actors.

passages (minus those already stored) -> actors holding `openai.AsyncOpenAI` clients, many requests in flight each,
one job-wide rate limit -> parse and filter each answer -> Parquet parts written as results arrive.
Every passage ends in the output exactly once, whatever happened to it (`status`). Rerunning the same command
resumes: stored passages are skipped, and answers received before a crash come from the response cache.
Writes OUTPUT/part-*.parquet (ANNOTATION_SCHEMA), OUTPUT/_run.json (the teacher settings of the parts) and
OUTPUT/_summary.json (written last: its presence means the stage finished).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from uniner import storage
from uniner.config import AnnotateConfig, to_dict
from uniner.conversations import type_statistics
from uniner.errors import UserError
from uniner.teacher import (
    Answer,
    RateLimiter,
    ResponseCache,
    Secret,
    Teacher,
    local_cache_uri,
    prompt_tokens,
    prompt_version,
)
from uniner.teacher_answers import filter_pairs, looks_like_refusal, parse_pairs

# `uniner pipeline` keeps a partial output of this stage: rerunning resumes it.

log = logging.getLogger(__name__)

# The annotations contract (docs/design.md section 1), the one place it is written down.
ENTITY = pa.struct([("text", pa.string()), ("type", pa.string()), ("in_passage", pa.bool_())])
DROPPED_ENTITY = pa.struct([("text", pa.string()), ("type", pa.string()), ("reason", pa.string())])
ANNOTATION_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),
        ("text", pa.string()),
        ("entities", pa.list_(ENTITY)),  # in_passage: the entity string occurs in the text as written
        ("dropped_entities", pa.list_(DROPPED_ENTITY)),  # filtered out: else-like type, non-English, duplicate, empty
        ("status", pa.string()),  # ok | malformed | refused | error
        ("raw_response", pa.string()),
        ("error", pa.string()),  # why the status is not ok; for ok, a note such as a cut-off answer
        ("teacher_model", pa.string()),
        ("prompt_version", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("from_cache", pa.bool_()),  # answered by the response cache: no request, no cost in this run
        ("attempts", pa.int64()),  # HTTP requests made for this passage (retries included) by the run that stored it
    ]
)
STATUSES = ("ok", "malformed", "refused", "error")
RUN_FILE = "_run.json"
PROGRESS_EVERY_S = 10.0
JOB_STOP = "job stopped: "  # an error that every request would meet (wrong key, model or URL); never stored


def annotation_row(passage_id: str, text: str, answer: Answer, *, model: str, version: str) -> dict[str, Any]:
    """One output row from a teacher answer: status, kept and dropped entities, tokens."""
    row = {
        "passage_id": passage_id,
        "text": text,
        "entities": [],
        "dropped_entities": [],
        "raw_response": answer.content,
        "error": answer.error,
        "teacher_model": model,
        "prompt_version": version,
        "input_tokens": answer.input_tokens,
        "output_tokens": answer.output_tokens,
        "from_cache": answer.from_cache,
        "attempts": answer.attempts,
    }
    if answer.error:
        return {**row, "status": "error"}
    if answer.refusal or answer.finish_reason == "content_filter":
        return {
            **row,
            "status": "refused",
            "raw_response": answer.content or answer.refusal,
            "error": f"the teacher declined: {answer.refusal or 'content filter'}",
        }
    parsed = parse_pairs(answer.content)
    if parsed.problem:
        status = "refused" if looks_like_refusal(answer.content) else "malformed"
        return {**row, "status": status, "error": "the teacher declined" if status == "refused" else parsed.problem}
    kept, dropped = filter_pairs(parsed.pairs, text)
    notes = []
    if parsed.truncated or answer.finish_reason == "length":
        notes.append("answer cut off at --max-tokens; the unfinished last tuple is left out")
    if parsed.skipped_items:
        notes.append(f"{parsed.skipped_items} list items were not (entity, type) pairs")
    return {**row, "status": "ok", "entities": kept, "dropped_entities": dropped, "error": "; ".join(notes)}


class AnnotateBatch:
    """Ray Data callable class: a batch of passages in, their annotations out; requests run concurrently."""

    def __init__(self, *, config: AnnotateConfig, api_key: Secret, limiter, cache_uri: str):
        self.config = config
        self.version = prompt_version(config.prompt_variant)
        cache = ResponseCache(cache_uri, s3_endpoint_url=config.s3_endpoint_url)
        self.teacher = Teacher(
            base_url=config.base_url,
            model=config.model,
            api_key=api_key,
            variant=config.prompt_variant,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            limiter=limiter,
            cache=cache,
            api_key_env=config.api_key_env,
        )
        self.slots: asyncio.Semaphore | None = None  # made on the actor's event loop, shared by all its batches

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.config.concurrency)
        ids, texts = batch["passage_id"].to_pylist(), batch["text"].to_pylist()
        rows = await asyncio.gather(*(self._one(pid, text) for pid, text in zip(ids, texts)))
        return pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA)

    async def _one(self, pid: str, text: str) -> dict[str, Any]:
        async with self.slots:
            try:
                answer = await self.teacher.ask(text)
            except UserError as error:
                # Ray Data does not carry an exception's type back to the driver: the driver sees the marker instead.
                answer = Answer(error=f"{JOB_STOP}{error}")
        return annotation_row(pid, text, answer, model=self.config.model, version=self.version)


# ---- input, output and resume ----


def read_passages(config: AnnotateConfig) -> pa.Table:
    """`passage_id` and `text` of the input passages, each id once."""
    location = config.locate(config.input)
    if not storage.exists(location):
        raise UserError(f"input {location} does not exist: give the output of `uniner passages`")
    with storage.storage_errors("read", location):
        dataset = pads.dataset(location.path, filesystem=location.fs, format="parquet")
        missing = {"passage_id", "text"} - set(dataset.schema.names)
        if missing:
            raise UserError(
                f"input {location} has no {', '.join(sorted(missing))} column: give the output of `uniner passages`"
            )
        table = dataset.to_table(columns=["passage_id", "text"])
    return table.take(first_occurrences(table["passage_id"].to_pylist()))


def first_occurrences(ids: list[str]) -> list[int]:
    """Row numbers of the first row of each id (passages are unique by contract; a repeat would be stored twice)."""
    seen: set[str] = set()
    return [i for i, pid in enumerate(ids) if not (pid in seen or seen.add(pid))]


def run_identity(config: AnnotateConfig) -> dict[str, Any]:
    """What makes stored parts reusable by a rerun: the same teacher, prompt and sampling."""
    return {
        "teacher_model": config.model,
        "prompt_version": prompt_version(config.prompt_variant),
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
    }


def open_output(output: storage.Location, config: AnnotateConfig) -> set[str]:
    """Prepare the output for this run; returns the passage ids it keeps (a resumed run skips them). Stored rows
    whose status is in `config.retry` are taken out, so that this run asks for those passages again."""
    identity = run_identity(config)
    run_file = output.join(RUN_FILE)
    if not config.overwrite and storage.exists(run_file):
        stored = storage.read_json(run_file)
        if stored != identity:
            changed = ", ".join(f"{k} {stored.get(k)!r} -> {v!r}" for k, v in identity.items() if stored.get(k) != v)
            raise UserError(
                f"output {output} holds annotations made with other settings ({changed}): "
                "pass --overwrite to start again, or choose another output"
            )
        return keep_stored(output, set(config.retry))
    storage.prepare_output(output, overwrite=config.overwrite)
    storage.write_json(run_file, identity)
    return set()


def keep_stored(output: storage.Location, retry: set[str]) -> set[str]:
    """Ids of the stored passages to keep; each part holding rows to retry is rewritten without them, in place
    (a part is replaced whole, so a crash leaves either the old part or the new one)."""
    kept: set[str] = set()
    with storage.storage_errors("read", output):
        dataset = pads.dataset(output.path, filesystem=output.fs, format="parquet", schema=ANNOTATION_SCHEMA)
        for fragment in dataset.get_fragments():
            part = fragment.to_table(schema=ANNOTATION_SCHEMA)
            again = to_retry(part["status"], retry)
            if pc.any(again).as_py():
                part = part.filter(pc.invert(again))
                replace_part(output, fragment.path, part)
            kept.update(part["passage_id"].to_pylist())
    return kept


def stored_ids(output: storage.Location, retry: set[str]) -> set[str]:
    """Ids of the stored passages that a rerun keeps (their status is not in `retry`)."""
    with storage.storage_errors("read", output):
        dataset = pads.dataset(output.path, filesystem=output.fs, format="parquet", schema=ANNOTATION_SCHEMA)
        table = dataset.to_table(columns=["passage_id", "status"])
    return set(table.filter(pc.invert(to_retry(table["status"], retry)))["passage_id"].to_pylist())


def to_retry(statuses: pa.ChunkedArray, retry: set[str]) -> pa.ChunkedArray:
    """True where a stored row's status is one that a rerun asks again."""
    return pc.is_in(statuses, value_set=pa.array(sorted(retry), pa.string()))


def write_part(output: storage.Location, table: pa.Table) -> None:
    """One Parquet part, visible under its final name only once complete (its `_` name is skipped by readers)."""
    replace_part(output, output.join(f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet").path, table)


def replace_part(output: storage.Location, path: str, table: pa.Table) -> None:
    """Write `table` as the part at `path`, whole or not at all; an empty table removes the part."""
    name = path.rsplit("/", 1)[-1]
    final, staging = output.join(name), output.join(f"_{name}")
    with storage.storage_errors("write", output):
        if not table.num_rows:
            output.fs.delete_file(final.path)
        elif output.is_s3:  # an S3 object appears whole or not at all
            pq.write_table(table, final.path, filesystem=final.fs)
        else:
            pq.write_table(table, staging.path, filesystem=staging.fs)
            output.fs.move(staging.path, final.path)  # a rename: it replaces an older part of that name at once


def read_api_key(config: AnnotateConfig) -> Secret:
    key = os.environ.get(config.api_key_env, "")
    if not key:
        log.info(
            "annotate: $%s is not set; sending a placeholder key (fine for a local server that needs none)",
            config.api_key_env,
        )
    return Secret(key)


def cache_uri(config: AnnotateConfig) -> str:
    return "" if config.cache == "off" else config.cache or local_cache_uri()


def cost(input_tokens: int, output_tokens: int, config: AnnotateConfig) -> float:
    return (input_tokens * config.price_input_per_mtok + output_tokens * config.price_output_per_mtok) / 1e6


class Progress:
    """Counts what has been stored this run; logs a line every few seconds."""

    def __init__(self, config: AnnotateConfig, *, todo: int, stored_before: int):
        self.config, self.todo, self.stored_before = config, todo, stored_before
        self.statuses: Counter[str] = Counter()
        self.billed_input = self.billed_output = self.requests = self.retries = self.from_cache = 0
        self.first_error = ""
        self.started = self.last_log = time.time()
        self.logged = 0  # passages counted in the last progress line

    def add(self, table: pa.Table) -> None:
        statuses = table["status"].to_pylist()
        self.statuses.update(statuses)
        billed = pc.invert(table["from_cache"])
        self.requests += pc.sum(table["attempts"]).as_py() or 0
        self.retries += sum(max(0, attempts - 1) for attempts in table["attempts"].to_pylist())
        errors = [e for s, e in zip(statuses, table["error"].to_pylist()) if s == "error"]
        if errors and not self.first_error:
            self.first_error = errors[0]
            log.warning(
                "annotate: a passage ended in error (%s); it is stored as such, and a rerun asks again", errors[0]
            )
        self.from_cache += pc.sum(table["from_cache"].cast(pa.int64())).as_py() or 0
        self.billed_input += pc.sum(pc.if_else(billed, table["input_tokens"], 0)).as_py() or 0
        self.billed_output += pc.sum(pc.if_else(billed, table["output_tokens"], 0)).as_py() or 0
        if time.time() - self.last_log >= PROGRESS_EVERY_S:
            self.log()

    def log(self) -> None:
        self.last_log = time.time()
        done = self.logged = sum(self.statuses.values())
        rate = done / max(1e-9, self.last_log - self.started)
        by_status = ", ".join(f"{s} {self.statuses[s]}" for s in STATUSES if self.statuses[s])
        log.info(
            "annotate: %d/%d passages (%s), %d retries, %.1f/s, %d input + %d output tokens billed, ~$%.4f",
            done,
            self.todo,
            by_status or "none yet",
            self.retries,
            rate,
            self.billed_input,
            self.billed_output,
            cost(self.billed_input, self.billed_output, self.config),
        )


def annotate(todo: pa.Table, output: storage.Location, config: AnnotateConfig, progress: Progress) -> None:
    """Send every passage of `todo` to the teacher and store the results as they arrive."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from uniner.session import init_ray

    init_ray()
    # The limiter lives on the driver's node: a worker node lost mid-run must not take the job-wide limit with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    limiter = (
        ray.remote(num_cpus=0)(RateLimiter)
        .options(name=f"uniner-annotate-limit-{uuid.uuid4().hex[:8]}", scheduling_strategy=here)
        .remote(config.requests_per_minute, config.tokens_per_minute)
    )
    # Blocks of a few batches each: an actor then runs several batches at once, each with its requests in flight.
    rows_per_block = config.batch_size * 4
    blocks = [todo.slice(start, rows_per_block) for start in range(0, todo.num_rows, rows_per_block)]
    calls_per_actor = max(1, math.ceil(config.concurrency / rows_per_block)) + 1
    results = ray.data.from_arrow(blocks).map_batches(
        AnnotateBatch,
        fn_constructor_kwargs={
            "config": config,
            "api_key": read_api_key(config),
            "limiter": limiter,
            "cache_uri": cache_uri(config),
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=config.num_actors,
            max_concurrent_calls_per_actor=calls_per_actor,
            max_tasks_in_flight_per_actor=calls_per_actor,
        ),
        num_cpus=0.25,  # the actors wait on the network, not the CPU
    )
    written: set[str] = set()
    for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        stop = next((e for e in table["error"].to_pylist() if e.startswith(JOB_STOP)), None)
        if stop:
            raise UserError(stop[len(JOB_STOP) :])
        fresh = [pid not in written for pid in table["passage_id"].to_pylist()]
        table = table.filter(pa.array(fresh, pa.bool_()))  # a task that Ray ran twice must not store its passages twice
        if table.num_rows:
            write_part(output, table)
            written.update(table["passage_id"].to_pylist())
            progress.add(table)
    if progress.logged != sum(progress.statuses.values()):  # the closing line, unless the last part was just logged
        progress.log()
    ray.kill(limiter)


# ---- the stage ----


def plan(config: AnnotateConfig) -> list[str]:
    """What the stage would do and roughly what it costs, for --dry-run (no request is sent)."""
    passages = read_passages(config)
    output = config.locate(config.output)
    resumes = storage.exists(output.join(RUN_FILE)) and not config.overwrite
    stored = stored_ids(output, set(config.retry)) if resumes else set()
    todo = passages.filter(pc.invert(pc.is_in(passages["passage_id"], value_set=pa.array(list(stored), pa.string()))))
    input_tokens = sum(prompt_tokens(text, config.prompt_variant) for text in todo["text"].to_pylist())
    output_bound = todo.num_rows * config.max_tokens
    minutes = max(todo.num_rows / config.requests_per_minute, (input_tokens + output_bound) / config.tokens_per_minute)
    cache = cache_uri(config) or "off"
    return [
        f"annotate {todo.num_rows} of {passages.num_rows} passages ({len(stored)} already stored in {config.output})",
        f"teacher {config.model} at {config.base_url}, prompt {prompt_version(config.prompt_variant)}, "
        f"temperature {config.temperature}",
        f"estimated input tokens (chars/4 rule): {input_tokens}; "
        f"output tokens at most {output_bound} ({config.max_tokens} per passage)",
        f"estimated cost: ${cost(input_tokens, 0, config):.4f} for input, "
        f"up to ${cost(input_tokens, output_bound, config):.4f} "
        f"with the longest answers (prices {config.price_input_per_mtok}/"
        f"{config.price_output_per_mtok} per million tokens)",
        f"at most {config.requests_per_minute} requests and {config.tokens_per_minute} tokens per minute: "
        f"at least {minutes:.1f} minutes "
        "(cached answers cost neither)",
        f"{config.num_actors} actors x {config.concurrency} requests in flight; response cache: {cache}",
        f"write annotations to {config.output} (Parquet parts), summary to {config.output}/{storage.SUMMARY_FILE}",
    ]


def run(config: AnnotateConfig) -> dict[str, Any]:
    """Run the stage; returns the summary that is also written to OUTPUT/_summary.json."""
    started = time.time()
    output = config.locate(config.output)
    passages = read_passages(config)
    stored = open_output(output, config)
    todo = passages.filter(pc.invert(pc.is_in(passages["passage_id"], value_set=pa.array(list(stored), pa.string()))))
    log.info(
        "annotate: %d passages, %d already stored, %d to annotate with %s",
        passages.num_rows,
        passages.num_rows - todo.num_rows,
        todo.num_rows,
        config.model,
    )
    progress = Progress(config, todo=todo.num_rows, stored_before=len(stored))
    if todo.num_rows:
        annotate(todo, output, config, progress)
    summary = summarize(output, config, progress, passages=passages.num_rows, seconds=time.time() - started)
    errors = summary["status"].get("error", 0)
    if errors:
        first = progress.first_error or "see the error column"
        summary["incomplete"] = (
            f"{errors} of {passages.num_rows} passages ended in error (first: {first}); the others "
            "are stored: run the same command again to ask for those passages again"
        )
    storage.write_json(output.join(storage.SUMMARY_FILE), summary)
    return summary


def summarize(
    output: storage.Location, config: AnnotateConfig, progress: Progress, *, passages: int, seconds: float
) -> dict[str, Any]:
    with storage.storage_errors("read", output):
        table = pads.dataset(output.path, filesystem=output.fs, format="parquet", schema=ANNOTATION_SCHEMA).to_table()
    entities = pc.list_flatten(table["entities"])
    dropped = pc.list_flatten(table["dropped_entities"])
    stored_input = pc.sum(table["input_tokens"]).as_py() or 0
    stored_output = pc.sum(table["output_tokens"]).as_py() or 0
    in_passage = pc.sum(pc.struct_field(entities, "in_passage").cast(pa.int64())).as_py() or 0
    return {
        "stage": "annotate",
        "input": config.input,
        "output": config.output,
        "teacher_model": config.model,
        "prompt_version": prompt_version(config.prompt_variant),
        "passages_in_input": passages,
        "passages_stored": table.num_rows,
        "records_written": table.num_rows,
        "stored_before_this_run": progress.stored_before,
        "status": {s: n for s, n in Counter(table["status"].to_pylist()).items()},
        "entities": len(entities),
        "entities_not_in_passage": len(entities) - in_passage,
        "entities_dropped": dict(Counter(pc.struct_field(dropped, "reason").to_pylist())),
        "types": type_statistics(Counter(pc.struct_field(entities, "type").to_pylist())),
        "tokens": {"input": stored_input, "output": stored_output},
        "cost_estimate_usd": round(cost(stored_input, stored_output, config), 6),
        "this_run": {
            "requests": progress.requests,
            "answered_from_cache": progress.from_cache,
            "input_tokens": progress.billed_input,
            "output_tokens": progress.billed_output,
            "cost_estimate_usd": round(cost(progress.billed_input, progress.billed_output, config), 6),
        },
        "seconds": round(seconds, 1),
        "config": to_dict(config),
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    statuses = ", ".join(f"{s} {summary['status'].get(s, 0)}" for s in STATUSES)
    dropped = ", ".join(f"{r} {n}" for r, n in summary["entities_dropped"].items()) or "none"
    this_run = summary["this_run"]
    return [
        f"passages stored:   {summary['passages_stored']} of {summary['passages_in_input']} ({statuses})",
        f"entities:          {summary['entities']} of {summary['types']['types']} distinct types; "
        f"{summary['entities_not_in_passage']} not found in their passage (flagged)",
        f"top 1% of types:   {summary['types']['top_1pct_types']} types cover "
        f"{summary['types']['top_1pct_types_mention_share']:.1%} of mentions",
        f"entities dropped:  {dropped}",
        f"tokens:            {summary['tokens']['input']} input, {summary['tokens']['output']} output; "
        f"cost estimate ${summary['cost_estimate_usd']:.4f}",
        f"this run:          {this_run['requests']} requests, "
        f"{this_run['answered_from_cache']} answers from the cache, "
        f"${this_run['cost_estimate_usd']:.4f}",
        f"took {summary['seconds']} s; summary in {summary['output']}/{storage.SUMMARY_FILE}",
    ]

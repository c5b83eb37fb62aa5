"""`uniner pipeline CONFIG.yaml`: several stages in order, each fed by the outputs of the ones before.

A stage whose output already holds its `_summary.json` finished earlier and is skipped, so rerunning after a
failure resumes at the first unfinished stage.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from uniner import recorded, storage
from uniner.config import STAGES, PipelineConfig, build_config, coerce, field_types, read_yaml, to_dict
from uniner.errors import UserError
from uniner.session import terminal

log = logging.getLogger(__name__)

INCOMPLETE = 3  # exit status of a run that stored every record, some of them as errors


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The pipeline file's settings with each `--set` applied; a --set value is checked here, so that a mistake in
    it is blamed on the --set and not on the file."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE: write e.g. --set passages.max_tokens=128")
        stage, dot, name = key.partition(".")
        if dot and stage not in STAGES:
            raise UserError(f"--set {item}: no stage {stage!r}; the stages are {', '.join(STAGES)}")
        cls = STAGES[stage].config if dot else PipelineConfig
        setting = (name if dot else key).replace("-", "_")
        kinds = field_types(cls)
        if setting not in kinds:
            raise UserError(
                f"--set {item}: unknown setting {setting!r}"
                + (f" for stage {stage}" if dot else "")
                + f"; known settings: {', '.join(kinds)}"
            )
        checked = coerce(value, kinds[setting], setting, f"in --set {item}")
        if dot:
            section = raw.setdefault(stage, {})
            if not isinstance(section, dict):
                raise UserError(f"section {stage!r} of the pipeline file is not a mapping")
            section[setting] = checked
        else:
            raw[setting] = checked
    return raw


def resolve(raw: dict[str, Any], where: str) -> tuple[PipelineConfig, dict[str, Any]]:
    """The pipeline settings and one checked config per stage to run, wired output -> input."""
    top_level = {k: v for k, v in raw.items() if k not in STAGES}
    pipeline = build_config(PipelineConfig, top_level, where)
    pipeline.check()
    workdir = storage.locate(pipeline.workdir, s3_endpoint_url=pipeline.s3_endpoint_url)
    configs: dict[str, Any] = {}
    # Every stage's output, whether or not it runs this time: a stage run alone reads what an earlier run wrote.
    outputs = {name: str((raw.get(name) or {}).get("output") or workdir.join(name).uri) for name in STAGES}
    if pipeline.sample_corpus_docs:
        outputs["corpus"] = workdir.join("corpus").uri
    elif isinstance(raw.get("passages"), dict) and raw["passages"].get("input"):
        outputs["corpus"] = str(raw["passages"]["input"])
    # Without a model trained in this run or an earlier one, extract and evaluate keep their own default model, the
    # built-in student, instead of a folder that does not exist.
    # Looked up only where a stage of this run reads it: the lookup is a request when the workdir is on S3.
    reads_a_model = any("train" in STAGES[name].sources.values() for name in pipeline.stages)
    if "train" not in pipeline.stages and not (
        reads_a_model and storage.exists(storage.locate(outputs["train"], s3_endpoint_url=pipeline.s3_endpoint_url))
    ):
        del outputs["train"]
    for name in pipeline.stages:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise UserError(f"section {name!r} {where} must be a mapping of settings")
        values = {"output": workdir.join(name).uri, "s3_endpoint_url": pipeline.s3_endpoint_url}
        # Unless its section says otherwise, a stage reads an earlier stage's output (from this run or an earlier
        # one), or the corpus (the sample corpus, else the passages stage's input); an evaluate that scores a
        # predictions file runs no model.
        sources = {key: source for key, source in STAGES[name].sources.items() if source in outputs}
        if section.get("predictions"):
            sources.pop("model", None)
        values.update({key: outputs[source] for key, source in sources.items()})
        values.update({str(k).replace("-", "_"): v for k, v in section.items()})
        cls = STAGES[name].config
        config = build_config(cls, {}, where)
        kinds = field_types(cls)
        for key, value in values.items():
            if key not in kinds:
                raise UserError(f"unknown setting {key!r} for stage {name} {where}")
            setattr(config, key, coerce(value, kinds[key], key, f"of stage {name} {where}"))
        config.check()
        config.check_output_apart()
        configs[name] = config
        outputs[name] = config.output
    return pipeline, configs


def run_file(path: str, *, overrides: list[str], dry_run: bool) -> int:
    raw = _apply_overrides(read_yaml(path), overrides)
    pipeline, configs = resolve(raw, f"in {path}")
    served = _served_teacher_name(pipeline)
    if served and "annotate" in configs:
        configs["annotate"].model = served
    modules = {name: importlib.import_module(STAGES[name].module) for name in configs}
    if dry_run:
        print("# uniner pipeline --dry-run")
        print(yaml.safe_dump(to_dict(pipeline), sort_keys=False).rstrip())
        if pipeline.sample_corpus_docs:
            print(f"- write a sample corpus of {pipeline.sample_corpus_docs} documents to {pipeline.workdir}/corpus")
        pending = set()  # stages of this run whose output does not exist yet
        for name, config in configs.items():
            waits_on = [source for source in STAGES[name].sources.values() if source in pending]
            stored = None if pending or config.overwrite else _finished_summary(config)
            if stored is not None:
                changed = _changed_settings(stored, config)
                what = f"with other settings ({changed}); the run would stop" if changed else "would be skipped"
                print(f"# {name}: finished earlier ({config.output}/{storage.SUMMARY_FILE}) {what}")
                continue
            if name == pipeline.stages[0] and pipeline.sample_corpus_docs:
                print_dry_run(name, config, ["(input is the sample corpus written first)"])
            elif waits_on:
                print_dry_run(name, config, [f"(reads the output of {', '.join(waits_on)}, written first)"])
            else:
                print_dry_run(name, config, modules[name].plan(config))
            pending.add(name)
        return 0
    if pipeline.sample_corpus_docs:
        _ensure_corpus(pipeline)
    summaries, skipped = {}, {}
    ran = False  # once a stage has run, every later one reads a new input: none of them is skipped or resumed
    for name, config in configs.items():
        stored = None if ran or config.overwrite else _finished_summary(config)
        if stored is not None:
            changed = _changed_settings(stored, config)
            if changed:
                raise UserError(
                    f"stage {name} finished earlier in {config.output} with other settings ({changed}): "
                    f"add --set {name}.overwrite=true to run it again with these settings (the stages "
                    "after it run again too), or put the earlier settings back"
                )
            log.info(
                "pipeline: %s finished earlier (%s/%s) with these settings, skipping",
                name,
                config.output,
                storage.SUMMARY_FILE,
            )
            summaries[name] = stored
            continue
        missing = _missing_inputs(name, config) if name in pipeline.optional_stages else []
        if missing:
            skipped[name] = f"skipped: {', '.join(missing)} not found"
            log.warning("pipeline: %s %s", name, skipped[name])
            continue
        log.info("pipeline: running %s -> %s", name, config.output)
        # A stage that resumes keeps its partial output, unless an earlier stage of this run wrote its input anew.
        config.overwrite = config.overwrite or ran or not STAGES[name].resumes
        if name == "annotate" and served:
            with _served_teacher(pipeline) as base_url:
                config.base_url = base_url
                summaries[name] = modules[name].run(config)
        else:
            summaries[name] = modules[name].run(config)
        ran = True
        if summaries[name].get("incomplete") or summaries[name].get("records_written") == 0:
            break  # the later stages would read an output with holes, or nothing
    stopped = next((name for name, summary in summaries.items() if not _complete(summary)), "")
    print(f"\nuniner pipeline: {'stopped at ' + stopped if stopped else 'done'}")
    for name in configs:
        if name not in summaries and name not in skipped:
            continue
        print(f"{name}: output in {configs[name].output}")
        lines = [skipped[name]] if name in skipped else modules[name].summary_lines(summaries[name])
        for line in lines:
            print("  " + line)
    if stopped and summaries[stopped].get("records_written") == 0:
        raise UserError(
            f"stage {stopped} wrote 0 records to {configs[stopped].output}, so the stages after it have "
            "nothing to read: check its input and settings (its summary above says what was dropped)"
        )
    return report_incomplete(stopped, summaries[stopped]) if stopped else 0


def report_incomplete(stage: str, summary: dict[str, Any]) -> int:
    """Exit status 3 with one line when a stage stored every record but some ended in error (a rerun retries them)."""
    if not summary.get("incomplete"):
        return 0
    print(f"uniner: error: {stage}: {summary['incomplete']}", file=terminal())
    return INCOMPLETE


def print_dry_run(name: str, config: Any, plan: list[str]) -> None:
    print(f"# uniner {name} --dry-run: resolved settings")
    print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
    print("# planned work")
    for line in plan:
        print(f"- {line}")


def _complete(summary: dict[str, Any]) -> bool:
    return not summary.get("incomplete") and summary.get("records_written") != 0


def _finished_summary(config: Any) -> dict[str, Any] | None:
    """The summary of a stage that finished earlier: written, with records, nothing left to retry; else None."""
    location = config.locate(config.output).join(storage.SUMMARY_FILE)
    if not storage.exists(location):
        return None
    summary = storage.read_json(location)
    return summary if _complete(summary) else None


# Settings that change how a stage runs, not what it writes: a finished stage is not stale when only these differ.
RUN_ONLY_SETTINGS = {
    "overwrite",
    "retry",
    "base_url",
    "concurrency",
    "num_actors",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout_s",
    "max_retries",
    "cache",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "replicas",
    "gpus_per_replica",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "s3_endpoint_url",
}


def _changed_settings(summary: dict[str, Any], config: Any) -> str:
    """The settings that differ from those the stored output was made with, as `name 'old' -> 'new'`; "" if none
    (or when the summary predates stored settings)."""
    stored, current = summary.get("config"), to_dict(config)
    if not isinstance(stored, dict):
        return ""
    names = sorted(k for k in current.keys() - RUN_ONLY_SETTINGS if k in stored and stored[k] != current[k])
    return ", ".join(f"{k} {stored[k]!r} -> {current[k]!r}" for k in names)


def _missing_inputs(name: str, config: Any) -> list[str]:
    """Input files of an optional stage that do not exist (evaluation data, a build-data input)."""
    uris = {"evaluate": lambda: config.data, "build-data": lambda: config.input}.get(name, lambda: [])()
    return [uri for uri in uris if not storage.exists(config.locate(uri))]


def _served_teacher_name(pipeline: PipelineConfig) -> str:
    """The teacher name annotate records when the pipeline serves the teacher itself; "" when annotate calls its own."""
    if pipeline.stand_in_teacher:
        return f"STAND-IN-TEACHER:{pipeline.stand_in_teacher}"
    return recorded.TEACHER if pipeline.recorded_teacher else ""


@contextmanager
def _served_teacher(pipeline: PipelineConfig) -> Iterator[str]:
    """Serve the pipeline's own teacher for the block and yield its base URL: a model spec on vLLM's server,
    labelled as a stand-in wherever the teacher is named, or the recorded answers."""
    if not pipeline.stand_in_teacher:
        with recorded.recorded_teacher() as base_url:
            yield base_url
        return
    from uniner.models import openai_server

    log.warning(
        "pipeline: annotate uses %s served locally as a STAND-IN teacher, not a real teacher", pipeline.stand_in_teacher
    )
    with openai_server(pipeline.stand_in_teacher, served_name=_served_teacher_name(pipeline)) as base_url:
        yield base_url


def _ensure_corpus(pipeline: PipelineConfig) -> None:
    from uniner.corpus import write_recorded_corpus, write_sample_corpus

    corpus = storage.locate(pipeline.workdir, s3_endpoint_url=pipeline.s3_endpoint_url).join("corpus")
    if storage.exists(corpus):
        return
    if pipeline.recorded_teacher:
        log.info("pipeline: writing %d recorded Pile passages to %s as the corpus", pipeline.sample_corpus_docs, corpus)
        write_recorded_corpus(
            corpus.uri, documents=pipeline.sample_corpus_docs, s3_endpoint_url=pipeline.s3_endpoint_url
        )
        return
    log.info("pipeline: writing a sample corpus of %d documents to %s", pipeline.sample_corpus_docs, corpus)
    write_sample_corpus(corpus.uri, documents=pipeline.sample_corpus_docs, s3_endpoint_url=pipeline.s3_endpoint_url)

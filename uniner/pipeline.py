"""`uniner pipeline CONFIG.yaml`: several stages in order, each fed by the outputs of the ones before.

A stage whose output already holds its `_summary.json` finished earlier and is skipped, so rerunning after a
failure resumes at the first unfinished stage.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from uniner import storage
from uniner.config import STAGE_CONFIGS, PipelineConfig, build_config, coerce, field_types, read_yaml, to_dict
from uniner.errors import UserError

log = logging.getLogger(__name__)

SUMMARY_FILE = "_summary.json"
# Where a stage's settings come from when its section does not set them: an earlier stage's output (from this run
# or an earlier one), or the corpus (the sample corpus, else the passages stage's input).
SOURCES = {
    "passages": {"input": "corpus"},
    "annotate": {"input": "passages"},
    "build-data": {"input": "annotate"},
    "train": {"data": "build-data"},
    "extract": {"input": "corpus", "model": "train"},
    "evaluate": {"model": "train"},
}


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE: write e.g. --set passages.max_tokens=128")
        stage, dot, name = key.partition(".")
        if dot:
            section = raw.setdefault(stage, {})
            if not isinstance(section, dict):
                raise UserError(f"section {stage!r} of the pipeline file is not a mapping")
            section[name] = value
        else:
            raw[key] = value
    return raw


def resolve(raw: dict[str, Any], where: str) -> tuple[PipelineConfig, dict[str, Any]]:
    """The pipeline settings and one checked config per stage to run, wired output -> input."""
    top_level = {k: v for k, v in raw.items() if k not in STAGE_CONFIGS}
    pipeline = build_config(PipelineConfig, top_level, where)
    pipeline.check()
    workdir = storage.locate(pipeline.workdir, s3_endpoint_url=pipeline.s3_endpoint_url)
    configs: dict[str, Any] = {}
    # Every stage's output, whether or not it runs this time: a stage run alone reads what an earlier run wrote.
    outputs = {name: str((raw.get(name) or {}).get("output") or workdir.join(name).uri) for name in STAGE_CONFIGS}
    if pipeline.sample_corpus_docs:
        outputs["corpus"] = workdir.join("corpus").uri
    elif isinstance(raw.get("passages"), dict) and raw["passages"].get("input"):
        outputs["corpus"] = str(raw["passages"]["input"])
    for name in pipeline.stages:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise UserError(f"section {name!r} {where} must be a mapping of settings")
        values = {"output": workdir.join(name).uri, "s3_endpoint_url": pipeline.s3_endpoint_url}
        values.update({key: outputs[source] for key, source in SOURCES[name].items() if source in outputs})
        values.update({str(k).replace("-", "_"): v for k, v in section.items()})
        cls = STAGE_CONFIGS[name]
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
    from uniner.cli import _print_dry_run, stage_module

    raw = _apply_overrides(read_yaml(path), overrides)
    pipeline, configs = resolve(raw, f"in {path}")
    modules = {name: stage_module(name) for name in configs}
    if dry_run:
        print("# uniner pipeline --dry-run")
        print(yaml.safe_dump(to_dict(pipeline), sort_keys=False).rstrip())
        if pipeline.sample_corpus_docs:
            print(f"- write a sample corpus of {pipeline.sample_corpus_docs} documents to {pipeline.workdir}/corpus")
        pending = set()  # stages of this run whose output does not exist yet
        for name, config in configs.items():
            waits_on = [source for source in SOURCES[name].values() if source in pending]
            finished = _finished(config)
            if finished:
                print(f"# {name}: finished earlier ({config.output}/{SUMMARY_FILE}); would be skipped")
            elif name == pipeline.stages[0] and pipeline.sample_corpus_docs:
                _print_dry_run(name, config, ["(input is the sample corpus written first)"])
            elif waits_on:
                _print_dry_run(name, config, [f"(reads the output of {', '.join(waits_on)}, written first)"])
            else:
                _print_dry_run(name, config, modules[name].plan(config))
            if not finished:
                pending.add(name)
        return 0
    if pipeline.sample_corpus_docs:
        _ensure_corpus(pipeline)
    summaries, skipped = {}, {}
    for name, config in configs.items():
        if _finished(config):
            log.info("pipeline: %s finished earlier (%s/%s), skipping", name, config.output, SUMMARY_FILE)
            summaries[name] = storage.read_json(storage.locate(config.output, s3_endpoint_url=config.s3_endpoint_url).join(SUMMARY_FILE))
            continue
        missing = _missing_inputs(name, config) if name in pipeline.optional_stages else []
        if missing:
            skipped[name] = f"skipped: {', '.join(missing)} not found"
            log.warning("pipeline: %s %s", name, skipped[name])
            continue
        log.info("pipeline: running %s -> %s", name, config.output)
        # A stage that resumes keeps its partial output; any other replaces it.
        config.overwrite = not getattr(modules[name], "RESUMES", False)
        if name == "annotate" and pipeline.stand_in_teacher:
            summaries[name] = _annotate_with_stand_in(modules[name], config, pipeline.stand_in_teacher)
        else:
            summaries[name] = modules[name].run(config)
    print("\nuniner pipeline: done")
    for name in configs:
        print(f"{name}: output in {configs[name].output}")
        lines = [skipped[name]] if name in skipped else modules[name].summary_lines(summaries[name])
        for line in lines:
            print("  " + line)
    return 0


def _missing_inputs(name: str, config: Any) -> list[str]:
    """Input files of an optional stage that do not exist (evaluation data, a build-data input)."""
    uris = {"evaluate": lambda: config.data, "build-data": lambda: config.input}.get(name, lambda: [])()
    return [uri for uri in uris if not storage.exists(storage.locate(uri, s3_endpoint_url=config.s3_endpoint_url))]


def _annotate_with_stand_in(module: Any, config: Any, spec: str) -> dict[str, Any]:
    """Run annotate against vLLM's own server for `spec`, labelled as a stand-in wherever the teacher is named."""
    from uniner.models import openai_server

    served_name = f"STAND-IN-TEACHER:{spec}"
    log.warning("pipeline: annotate uses %s served locally as a STAND-IN teacher, not a real teacher", spec)
    with openai_server(spec, served_name=served_name) as base_url:
        config.base_url, config.model = base_url, served_name
        return module.run(config)


def _finished(config: Any) -> bool:
    return storage.exists(storage.locate(config.output, s3_endpoint_url=config.s3_endpoint_url).join(SUMMARY_FILE))


def _ensure_corpus(pipeline: PipelineConfig) -> None:
    from uniner.corpus import write_sample_corpus

    corpus = storage.locate(pipeline.workdir, s3_endpoint_url=pipeline.s3_endpoint_url).join("corpus")
    if storage.exists(corpus):
        return
    log.info("pipeline: writing a sample corpus of %d documents to %s", pipeline.sample_corpus_docs, corpus)
    write_sample_corpus(corpus.uri, documents=pipeline.sample_corpus_docs, s3_endpoint_url=pipeline.s3_endpoint_url)

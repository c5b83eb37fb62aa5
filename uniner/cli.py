"""The `uniner` command: one subcommand per stage, plus `pipeline CONFIG.yaml` for several at once."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from typing import Any

import yaml

from uniner import __version__
from uniner.config import STAGE_CONFIGS, PipelineConfig, add_arguments, load_config, to_dict
from uniner.errors import UserError

log = logging.getLogger("uniner")
INCOMPLETE = 3  # exit status of a run that stored every record, some of them as errors

# Stage name -> module with `plan(config) -> list[str]`, `run(config) -> dict` and `summary_lines(dict)`.
STAGE_MODULES = {
    "passages": "uniner.passages",
    "annotate": "uniner.annotate",
    "build-data": "uniner.build_data",
    "train": "uniner.train",
    "extract": "uniner.extract",
    "evaluate": "uniner.evaluate",
}


def stage_module(name: str):
    return importlib.import_module(STAGE_MODULES[name])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved settings and the planned work, and do nothing.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniner",
        allow_abbrev=False,
        description="Open named-entity recognition by targeted distillation (UniversalNER), run as Ray batch jobs.",
    )
    parser.add_argument("--version", action="version", version=f"uniner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in STAGE_CONFIGS.items():
        summary = (cls.__doc__ or "").strip().split(": ", 1)[-1]
        sub = commands.add_parser(name, help=summary, description=summary, allow_abbrev=False)
        sub.add_argument("--config", metavar="FILE.yaml", help="Load settings from a YAML mapping; options given here override it.")
        _common(sub)
        add_arguments(sub, cls)
        sub.set_defaults(handler=_run_stage, stage=name)
    pipeline = commands.add_parser(
        "pipeline",
        allow_abbrev=False,
        help="Run several stages from one YAML file, each stage's output the next one's input.",
        description=(PipelineConfig.__doc__ or "").strip() + " Top-level keys: "
        + ", ".join(f"{k} ({v})" for k, v in _pipeline_help().items()) + "; plus one mapping of settings per stage.",
    )
    pipeline.add_argument("config_file", metavar="CONFIG.yaml", help="The pipeline file (see jobs/local.yaml).")
    pipeline.add_argument("--set", action="append", default=[], metavar="STAGE.SETTING=VALUE", help="Override one setting, e.g. --set passages.max_tokens=128 or --set workdir=out.")
    _common(pipeline)
    pipeline.set_defaults(handler=_run_pipeline)
    return parser


def _pipeline_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(PipelineConfig)}


def _run_stage(args: argparse.Namespace) -> int:
    cls = STAGE_CONFIGS[args.stage]
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    config = load_config(cls, yaml_path=args.config, overrides=overrides)
    module = stage_module(args.stage)
    if args.dry_run:
        _print_dry_run(args.stage, config, module.plan(config))
        return 0
    summary = module.run(config)
    print(f"\nuniner {args.stage}: {'incomplete' if summary.get('incomplete') else 'done'}")
    for line in module.summary_lines(summary):
        print("  " + line)
    return report_incomplete(args.stage, summary)


def report_incomplete(stage: str, summary: dict[str, Any]) -> int:
    """Exit status 3 with one line when a stage stored every record but some ended in error (a rerun retries them)."""
    if not summary.get("incomplete"):
        return 0
    print(f"uniner: error: {stage}: {summary['incomplete']}", file=sys.stderr)
    return INCOMPLETE


def _print_dry_run(name: str, config: Any, plan: list[str]) -> None:
    print(f"# uniner {name} --dry-run: resolved settings")
    print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
    print("# planned work")
    for line in plan:
        print(f"- {line}")


def _run_pipeline(args: argparse.Namespace) -> int:
    from uniner import pipeline

    return pipeline.run_file(args.config_file, overrides=args.set, dry_run=args.dry_run)


def _find_user_error(error: BaseException) -> UserError | None:
    """A UserError raised inside a Ray task arrives wrapped; find it in the cause chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _unknown_options(args: argparse.Namespace, extra: list[str]) -> int:
    """One line for options the subcommand does not have, with the nearest known one."""
    import difflib

    if args.command == "pipeline":
        known = ["--set", "--dry-run", "--debug"]
    else:
        known = ["--config", "--dry-run", "--debug"]
        known += ["--" + f.name.replace("_", "-") for f in dataclasses.fields(STAGE_CONFIGS[args.command])]
    option = next((item for item in extra if item.startswith("-")), extra[0]).split("=", 1)[0]
    near = difflib.get_close_matches(option, known, n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    print(f"uniner: error: `uniner {args.command}` has no option {option!r} ({' '.join(extra)[:80]}): {hint}"
          f"`uniner {args.command} --help` lists them", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        return _unknown_options(args, extra)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("filelock", "urllib3", "botocore", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.debug:  # Ray core's INFO lines on the driver (Ray Data configures its own logger); uniner says what runs
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("uniner: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place that decides how errors reach the user
        user_error = _find_user_error(error)
        if args.debug:
            raise
        if user_error is not None:
            print(f"uniner: error: {user_error}", file=sys.stderr)
            return 2
        reason = " ".join(str(error).split())[:500]
        print(f"uniner: internal error: {type(error).__name__}: {reason} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `uniner` command: one subcommand per stage, plus `pipeline CONFIG.yaml` for several at once."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys

from uniner import __version__
from uniner.config import STAGES, PipelineConfig, add_arguments, load_config
from uniner.errors import UserError
from uniner.pipeline import print_dry_run, report_incomplete
from uniner.session import diverted, leave_ray, quiet_terminal

log = logging.getLogger("uniner")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the resolved settings and the planned work, and do nothing."
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniner",
        allow_abbrev=False,
        description="Open named-entity recognition by targeted distillation (UniversalNER), run as Ray batch jobs.",
    )
    parser.add_argument("--version", action="version", version=f"uniner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        cls = stage.config
        summary = (cls.__doc__ or "").strip().split(": ", 1)[-1]
        sub = commands.add_parser(name, help=summary, description=summary, allow_abbrev=False)
        sub.add_argument(
            "--config", metavar="FILE.yaml", help="Load settings from a YAML mapping; options given here override it."
        )
        _common(sub)
        add_arguments(sub, cls)
        sub.set_defaults(handler=_run_stage, stage=name)
    pipeline = commands.add_parser(
        "pipeline",
        allow_abbrev=False,
        help="Run several stages from one YAML file, each stage's output the next one's input.",
        description=(PipelineConfig.__doc__ or "").strip()
        + " Top-level keys: "
        + ", ".join(f"{k} ({v})" for k, v in _pipeline_help().items())
        + "; plus one mapping of settings per stage.",
    )
    pipeline.add_argument("config_file", metavar="CONFIG.yaml", help="The pipeline file (see jobs/local.yaml).")
    pipeline.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.SETTING=VALUE",
        help="Override one setting, e.g. --set passages.max_tokens=128 or --set workdir=out.",
    )
    _common(pipeline)
    pipeline.set_defaults(handler=_run_pipeline)
    return parser


def _pipeline_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(PipelineConfig)}


def _run_stage(args: argparse.Namespace) -> int:
    stage = STAGES[args.stage]
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(stage.config)}}
    config = load_config(stage.config, yaml_path=args.config, overrides=overrides)
    module = importlib.import_module(stage.module)
    if args.dry_run:
        print_dry_run(args.stage, config, module.plan(config))
        return 0
    summary = module.run(config)
    print(f"\nuniner {args.stage}: {'incomplete' if summary.get('incomplete') else 'done'}")
    for line in module.summary_lines(summary):
        print("  " + line)
    return report_incomplete(args.stage, summary)


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
        known += ["--" + f.name.replace("_", "-") for f in dataclasses.fields(STAGES[args.command].config)]
    option = next((item for item in extra if item.startswith("-")), extra[0]).split("=", 1)[0]
    near = difflib.get_close_matches(option, known, n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    print(
        f"uniner: error: `uniner {args.command}` has no option {option!r} ({' '.join(extra)[:80]}): {hint}"
        f"`uniner {args.command} --help` lists them",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        return _unknown_options(args, extra)
    if args.debug:
        return _run(args, sys.stderr)
    with quiet_terminal() as terminal:
        status = _run(args, terminal)
    places = diverted()
    if "logs" in places:
        print(
            f"Ray's logs: {places['logs']}; this process's other output: {places['stderr']} (--debug shows both here)"
        )
    elif places:  # Ray's logs folder is known only once Ray has started: a Ray that failed to start has none
        print(f"this process's other output: {places['stderr']} (--debug shows it here)")
    return status


def _run(args: argparse.Namespace, terminal) -> int:
    """Run the command with uniner's log lines and errors on `terminal`; the exit status."""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=terminal,
    )
    for noisy in ("filelock", "urllib3", "botocore", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Ray core's INFO lines on the driver (Ray Data configures its own logger); uniner says what runs.
    if not args.debug:
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("uniner: interrupted", file=terminal)
        return 130
    except Exception as error:  # the one place that decides how errors reach the user
        user_error = _find_user_error(error)
        if args.debug:
            raise
        leave_ray()  # the reason is the last line, after Ray's own about the work it stops
        if user_error is not None:
            print(f"uniner: error: {user_error}", file=terminal)
            return 2
        reason = " ".join(str(error).split())[:500]
        print(
            f"uniner: internal error: {type(error).__name__}: {reason} (rerun with --debug for the traceback)",
            file=terminal,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The Ray session: the cluster named by RAY_ADDRESS (so `ray job submit` works), else an embedded local one."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from uniner.errors import UserError

log = logging.getLogger(__name__)
_embedded_gcs_address: str | None = None  # the GCS of the local Ray that init_ray started, if any
# The terminal's stderr within quiet_terminal(), where an embedded Ray keeps its output out of the terminal.
_terminal: TextIO | None = None
_diverted: dict[str, str] = {}  # where the output kept out of the terminal went: "stderr" file, Ray's "logs" folder
# uniner's own lines among those Ray forwards from its workers: progress lines (`uniner train: step ...`) and
# uniner loggers' records (`12:00:00 uniner.extract: ...`, as worker_logging formats them).
OWN_LINE = re.compile(r"^(\d\d:\d\d:\d\d )?uniner(\.[\w.]+| [\w-]+)?: ")


@contextmanager
def quiet_terminal() -> Iterator[TextIO]:
    """For one CLI command: yields a stream on the terminal's stderr for uniner's own lines and errors.

    Once init_ray starts an embedded Ray inside the block, the rest of this process's stderr (Ray's core and GCS
    messages, Ray Data's INFO lines, the token-auth notice, libraries' warnings) goes to a file, and of the lines
    Ray forwards from its workers (vLLM's engine logs, the tracebacks of a normal vLLM shutdown) only uniner's own
    reach the terminal; Ray keeps every worker line in its log folder. `diverted()` says where both are.
    """
    global _terminal
    _terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    saved_fd, saved_stream = os.dup(2), sys.stderr
    try:
        yield _terminal
    finally:
        if "ray" in sys.modules and embedded():  # its shutdown messages go where the rest of its output went
            import ray

            ray.shutdown()
        _terminal = None  # logging handlers may still hold it; it stays open until the process ends
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if sys.stderr is not saved_stream:
            sys.stderr.close()
            sys.stderr = saved_stream


def terminal() -> TextIO:
    """The stream for uniner's own lines and errors: the terminal's stderr, also within quiet_terminal()."""
    return _terminal or sys.stderr


def diverted() -> dict[str, str]:
    """Where quiet_terminal() sent what it kept out of the terminal: {"stderr": file, "logs": Ray's log folder}."""
    return dict(_diverted)


def worker_logging() -> None:
    """Ray's worker setup hook: uniner's loggers write `HH:MM:SS name: message` lines, which the driver recognises
    as uniner's own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("uniner")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _divert_stderr() -> None:
    """Point this process's stderr (file descriptor 2, which Ray's C++ core writes to as well) at a file."""
    handle, path = tempfile.mkstemp(prefix=f"uniner-{os.getpid()}-", suffix=".stderr.log")
    sys.stderr.flush()
    os.dup2(handle, 2)
    os.close(handle)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    _diverted["stderr"] = path


def _forward_only_own_lines() -> None:
    """Show only uniner's own lines of those Ray forwards from workers. Ray has no public hook for this: the
    driver's dispatcher of forwarded lines is replaced; where its internals differ, every line shows as before."""
    try:
        from ray._private import worker

        dispatcher = worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError):
        log.debug("Ray's forwarded worker lines cannot be filtered here; all of them show")
        return

    def print_own_lines(data: dict[str, Any]) -> None:
        source = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        stream = terminal() if data.get("is_err") else sys.stdout
        for line in data.get("lines", []):
            if OWN_LINE.match(line):
                print(f"{source} {line}", file=stream, flush=True)

    dispatcher.add_handler("ray_print_logs", print_own_lines)


def _worker_python_path() -> str:
    """PYTHONPATH for the embedded Ray's workers: the folder holding this uniner first, so that workers import the
    driver's code even when it runs from a checkout that is not installed (a worker that cannot import uniner
    fails its setup hook, and Ray retries such tasks without end)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


def init_ray(*, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS when set, otherwise start a local Ray sized to this machine; say which."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("Connecting to the Ray cluster at %s (RAY_ADDRESS)", address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            raise UserError(
                f"cannot connect to Ray at {address} ({reason}): start the cluster, or unset RAY_ADDRESS to run locally"
            ) from None
        _quiet_data_progress()
        return
    cpus = num_cpus or os.cpu_count() or 1
    log.info("Starting an embedded local Ray with %d CPUs (set RAY_ADDRESS to use a cluster)", cpus)
    # address="local": never attach to a cluster that someone started on this machine with `ray start`.
    global _embedded_gcs_address
    quiet = _terminal is not None
    if quiet:
        _divert_stderr()
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": _worker_python_path()}}
    if quiet:
        runtime_env["worker_process_setup_hook"] = "uniner.session.worker_logging"
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, runtime_env=runtime_env)
    _embedded_gcs_address = ray.get_runtime_context().gcs_address
    if quiet:
        _forward_only_own_lines()
        _diverted["logs"] = _ray_logs_folder()
    _quiet_data_progress()


def _ray_logs_folder() -> str:
    try:
        from ray._private import worker

        return os.path.join(worker._global_node.get_session_dir_path(), "logs")
    except (ImportError, AttributeError):
        return "the logs folder of Ray's session (/tmp/ray/session_latest/logs by default)"


def _quiet_data_progress() -> None:
    """uniner logs its own progress. Ray Data's bars stay where they redraw in place (a terminal); in a job's log
    (`ray job logs -f`) they would be blocks of lines every few seconds."""
    import ray

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    if _terminal is not None or not sys.stderr.isatty():
        context.enable_progress_bars = False


def leave_ray() -> None:
    """Disconnect from Ray, if connected: the lines it forwards (workers stopped with the run, tasks it gives up) stop
    here, so that what uniner prints next comes last in a job's log."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def embedded() -> bool:
    """Whether the connected Ray is the embedded local one that init_ray started (one machine, no autoscaler)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs_address


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))

"""The Ray session: the cluster named by RAY_ADDRESS (so `ray job submit` works), else an embedded local one."""

from __future__ import annotations

import logging
import os
import sys

from uniner.errors import UserError

log = logging.getLogger(__name__)
_embedded_gcs_address: str | None = None  # the GCS of the local Ray that init_ray started, if any


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
            raise UserError(f"cannot connect to Ray at {address} ({reason}): start the cluster, or unset RAY_ADDRESS to run locally") from None
        _quiet_data_progress()
        return
    cpus = num_cpus or os.cpu_count() or 1
    log.info("Starting an embedded local Ray with %d CPUs (set RAY_ADDRESS to use a cluster)", cpus)
    # address="local": never attach to a cluster that someone started on this machine with `ray start`.
    global _embedded_gcs_address
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False)
    _embedded_gcs_address = ray.get_runtime_context().gcs_address
    _quiet_data_progress()


def _quiet_data_progress() -> None:
    """uniner logs its own progress. Ray Data's bars stay where they redraw in place (a terminal); in a job's log
    (`ray job logs -f`) they would be blocks of lines every few seconds."""
    import ray

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    if not sys.stderr.isatty():
        context.enable_progress_bars = False


def embedded() -> bool:
    """Whether the connected Ray is the embedded local one that init_ray started (one machine, no autoscaler)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs_address


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))

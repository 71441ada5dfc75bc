"""Connect to Ray: the cluster named by ``RAY_ADDRESS`` (or a running local one), else a local
instance started by this process."""

from __future__ import annotations

import logging
import os


log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = False) -> None:
    """Initialise Ray once; a local instance uses ``num_cpus`` (default: all).
    ``log_to_driver`` forwards the workers' output (the training progress lines) here.

    The local instance runs the dashboard: Ray Train's placement-group cleaner asks its State API
    whether a Train controller died, and without it the placement group of a controller that was
    killed (a Tune trial stopped early or interrupted) is never released and its CPUs stay held.
    """
    import ray

    if ray.is_initialized():
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per dataset, not a stream of progress logs
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # execution plans are not news to a user
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=log_to_driver,
             configure_logging=True, logging_level=logging.WARNING)


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))

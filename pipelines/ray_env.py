"""Connect to Ray: the cluster named by ``RAY_ADDRESS`` (or a running local one), else a local
instance started by this process."""

from __future__ import annotations

import logging
import os
import socket

from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

#: How the MLflow client authenticates to a tracking server; passed on to Ray's workers and actors,
#: which log to MLflow themselves (they do not inherit the driver's environment on a cluster).
MLFLOW_AUTH_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                    "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def mlflow_auth_env() -> dict[str, str]:
    return {name: os.environ[name] for name in MLFLOW_AUTH_VARS if name in os.environ}


def runtime_env() -> dict | None:
    """The runtime environment that gives Ray's processes this driver's MLflow credentials."""
    env = mlflow_auth_env()
    return {"env_vars": env} if env else None


#: Ray Train's controller polls its workers every 2 s by default, and a run pays for the wait at
#: each step between start and end (a tiny-model pipeline run: ~11 s of its ~40). A missed poll
#: is harmless: a worker counts as dead only after ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``.
TRAIN_POLL_VAR, TRAIN_POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def default_train_poll_interval() -> None:
    """Set Ray Train's poll interval in this process unless the user did. Ray Train passes it from
    the driver to its controller, and a local Ray started afterwards hands it to every process."""
    os.environ.setdefault(TRAIN_POLL_VAR, TRAIN_POLL_DEFAULT_S)


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = False) -> None:
    """Initialise Ray once; a local instance uses ``num_cpus`` (default: all).
    ``log_to_driver`` forwards the workers' output (the training progress lines) here.

    The local instance runs the dashboard: Ray Train's placement-group cleaner asks its State API
    whether a Train controller died, and without it the placement group of a controller that was
    killed (a Tune trial stopped early or interrupted) is never released and its CPUs stay held.
    """
    import ray

    default_train_poll_interval()
    if ray.is_initialized():
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per dataset, not a stream of progress logs
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # execution plans are not news to a user
    address = named_cluster() or running_local_cluster()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env())
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=log_to_driver,
             configure_logging=True, logging_level=logging.WARNING, runtime_env=runtime_env())


def named_cluster(timeout_s: float = 5.0) -> str | None:
    """``RAY_ADDRESS``, refused at once when nothing answers at its ``host:port``.

    Ray would retry a dead address for minutes before failing. Addresses without a port to try
    (``auto``, ``local``, other schemes) go to Ray as they are.
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    target = address.removeprefix("ray://")
    if ":" in target and "://" not in target and not answers(target, timeout_s):
        raise PipelineError(f"RAY_ADDRESS={address}: no Ray cluster answers there (is it up, and is the "
                            "port right?); unset RAY_ADDRESS to run on a local Ray")
    return address


def running_local_cluster(timeout_s: float = 2.0) -> str | None:
    """The address that ``ray start`` recorded on this machine, if a cluster still answers there.

    Left to itself, ``ray.init()`` connects to a recorded address without asking whether anything
    listens: after a cluster that stopped without ``ray stop`` (a crash, a killed machine) it
    retries for minutes and fails. A dead address is passed over with a warning.
    """
    address = recorded_cluster_address()
    if not address:
        return None
    if not answers(address, timeout_s):
        log.warning("Ray's address file names a cluster at %s that does not answer (stopped without "
                    "`ray stop`?); starting a local Ray instead", address)
        return None
    log.info("connecting to the Ray cluster that `ray start` left running at %s", address)
    return address


def answers(address: str, timeout_s: float) -> bool:
    """Whether anything accepts a TCP connection at ``host:port`` (``[v6]:port`` too)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def recorded_cluster_address() -> str | None:
    """What ``ray start`` wrote to Ray's address file (``/tmp/ray/ray_current_cluster``), if any."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # a private helper; should Ray move it, a local instance is started
        return None
    return read_ray_address() or None


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))

"""Ray set-up and worker sizing from the cluster's free resources.

A 2-CPU laptop must not deadlock: Ray Data's read and write tasks need a CPU while training workers
or scoring actors hold theirs, so on CPU-only clusters one CPU is always left free for them.
Ray then starts a 1-CPU worker with OMP_NUM_THREADS=1, which would run torch on one core of two; so
the CPU workers and actors sized here set their torch threads themselves (``cpu_threads``): the
cluster's CPUs shared out between them, the one kept free included (Ray Data's short tasks use it
only now and then).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray

from selectmoe.config import ScalingSection

logger = logging.getLogger(__name__)

RESERVED_CPUS = 1.0  # kept free for Ray Data tasks on CPU-only clusters
MIN_WORKER_CPUS = 0.25
DASHBOARD_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
DASHBOARD_PORT_ATTEMPTS = 4


def ensure_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one (``start_local_ray``)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True)


def start_local_ray(**init_kwargs):
    """Start a local Ray with the dashboard, and tell its workers where that dashboard is.

    Ray Train's placement-group cleaner (a detached actor) asks the State API, served by the
    dashboard, whether a run's controller died; without it a stopped run (e.g. a trial ASHA stops)
    keeps its workers' CPUs reserved and the next run starves. The cleaner finds the dashboard through
    RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else by auto-detection, which fails ("Found multiple
    active Ray instances"; the cleaner's thread dies with it) as soon as a second Ray runs on the
    machine: another user's, or a test session's beside a driver process. So the dashboard gets a
    port chosen here and every worker of this job gets RAY_API_SERVER_ADDRESS pointing at it (the
    job's runtime env); if the dashboard came up on another port (taken meanwhile), Ray is restarted
    on a new one. Two commands started together on one machine each start their own local Ray: the
    one that loses the race for a port (Ray then fails to start its dashboard) retries on another.
    Returns ``ray.init``'s context."""
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    for attempt in range(DASHBOARD_PORT_ATTEMPTS):
        port = _free_port(DEFAULT_DASHBOARD_PORT if attempt == 0 else 0)
        url = f"{DASHBOARD_HOST}:{port}"
        env_vars = {**runtime_env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": f"http://{url}"}
        try:
            context = ray.init(
                include_dashboard=True,
                dashboard_host=DASHBOARD_HOST,
                dashboard_port=port,
                runtime_env={**runtime_env, "env_vars": env_vars},
                **init_kwargs,
            )
        except Exception as err:  # another local Ray took the port between the check and the bind
            logger.warning("a local Ray could not start on dashboard port %d (%s); trying another", port, err)
            ray.shutdown()
            continue
        if context.dashboard_url == url:
            return context
        logger.warning("the Ray dashboard came up on %s, not %s; restarting Ray", context.dashboard_url, url)
        ray.shutdown()
    raise RuntimeError(f"could not start a local Ray with its dashboard on a port of our choosing: {url}")


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it now, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((DASHBOARD_HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def free_resources() -> dict[str, float]:
    ensure_ray()
    return ray.available_resources()


def use_gpu(section: ScalingSection) -> bool:
    if section.use_gpu is not None:
        return section.use_gpu
    return free_resources().get("GPU", 0) >= 1


@dataclass(frozen=True)
class WorkerLayout:
    """A Ray Train run's workers: how many, the resources each holds, and (CPU) its torch threads."""

    workers: int
    resources: dict[str, float]
    use_gpu: bool
    cpu_threads: int | None = None  # None = leave torch's thread count as Ray set it


def cpu_threads(processes: int) -> int:
    """Torch threads for each of ``processes`` CPU workers or actors sized by this module: the
    cluster's CPUs shared out between them (1 worker on a 2-CPU laptop: 2; 15 actors on 16 CPUs: 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) // processes))


def worker_layout(section: ScalingSection) -> WorkerLayout:
    """The workers of a Ray Train run, sized from the free resources unless the section sets them."""
    gpu = use_gpu(section)
    free = free_resources()
    if gpu:
        workers = section.num_workers or max(1, int(free.get("GPU", 1)))
        resources = section.resources_per_worker or {"GPU": 1.0, "CPU": 1.0}
        return WorkerLayout(workers, resources, True)
    cpus = free.get("CPU", 1.0)
    workers = section.num_workers or 1
    if section.resources_per_worker:  # Ray's OMP_NUM_THREADS follows the CPUs asked for
        return WorkerLayout(workers, section.resources_per_worker, False)
    per_worker = max(MIN_WORKER_CPUS, (cpus - RESERVED_CPUS) / workers)
    per_worker = round(per_worker, 2)
    if per_worker * workers > cpus - RESERVED_CPUS + 1e-6:
        logger.warning(
            "%d workers x %.2f CPU leave less than %.0f CPU free for Ray Data (%.1f CPUs free now)",
            workers,
            per_worker,
            RESERVED_CPUS,
            cpus,
        )
    return WorkerLayout(workers, {"CPU": per_worker}, False, cpu_threads(workers))

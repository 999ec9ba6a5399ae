"""Ray set-up and worker sizing from the cluster's free resources.

A 2-CPU laptop must not deadlock: Ray Data's read and write tasks need a CPU while training workers
or scoring actors hold theirs, so on CPU-only clusters one CPU is always left free for them.
"""

from __future__ import annotations

import logging
import os

import ray

from selectmoe.config import ScalingSection

logger = logging.getLogger(__name__)

RESERVED_CPUS = 1.0  # kept free for Ray Data tasks on CPU-only clusters
MIN_WORKER_CPUS = 0.25


def ensure_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one.

    A local cluster gets the dashboard: Ray Train's placement-group cleaner asks the State API (served
    by the dashboard) whether a controller died, so without it a stopped run (e.g. a trial ASHA
    stops) keeps its workers' CPUs reserved and the next run starves."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(log_to_driver=True, include_dashboard=True)


def free_resources() -> dict[str, float]:
    ensure_ray()
    return ray.available_resources()


def use_gpu(section: ScalingSection) -> bool:
    if section.use_gpu is not None:
        return section.use_gpu
    return free_resources().get("GPU", 0) >= 1


def worker_layout(section: ScalingSection) -> tuple[int, dict[str, float], bool]:
    """(num_workers, resources_per_worker, use_gpu) for a Ray Train run."""
    gpu = use_gpu(section)
    free = free_resources()
    if gpu:
        workers = section.num_workers or max(1, int(free.get("GPU", 1)))
        resources = section.resources_per_worker or {"GPU": 1.0, "CPU": 1.0}
        return workers, resources, True
    cpus = free.get("CPU", 1.0)
    workers = section.num_workers or 1
    if section.resources_per_worker:
        return workers, section.resources_per_worker, False
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
    return workers, {"CPU": per_worker}, False

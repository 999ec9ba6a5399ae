"""Driver side of the Ray Train stages (1 and 3): the step plan, the loop config, the ``TorchTrainer``.

The run name is a hash of the config (fault injection excluded), and checkpoints live under
``output_dir/ray_train``: rerunning the same config into the same ``output_dir`` resumes from the
last checkpoint, and ``scaling.max_failures`` restarts a failed worker group from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from selectmoe.config import to_dict
from selectmoe.data import DataError
from selectmoe.layout import RAY_TRAIN_DIR
from selectmoe.manifest import hash_dict
from selectmoe.training.common import BatchPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    batch: BatchPlan
    steps_per_epoch: int
    total_steps: int


def plan_steps(stage: str, num_rows: int, training, workers: int) -> StepPlan:
    """Cut ``num_rows`` into optimiser steps: effective batch = per device x accumulation x workers."""
    plan = BatchPlan(training.batch_size, training.per_device_batch_size, workers)
    if not plan.is_exact:
        logger.warning(
            "%s: training.batch_size=%d is not a multiple of per_device_batch_size x workers = %d; "
            "training with %s",
            stage,
            training.batch_size,
            plan.per_device * workers,
            plan.describe(),
        )
    steps_per_epoch = plan.steps_per_epoch(num_rows)
    if steps_per_epoch == 0:
        raise DataError(
            f"{num_rows} training rows are fewer than one global batch of {plan.effective_batch}; "
            "lower training.batch_size or use more rows"
        )
    total_steps = steps_per_epoch * training.epochs
    if training.max_steps > 0:
        total_steps = min(total_steps, training.max_steps)
    logger.info(
        "%s: %d rows, %d workers, %s, %d steps", stage, num_rows, workers, plan.describe(), total_steps
    )
    return StepPlan(plan, steps_per_epoch, total_steps)


def loop_config(cfg, steps: StepPlan, *, pad_token_id: int, output_dir: Path) -> dict:
    """The keys ``selectmoe.training.loop.run_training_loop`` reads; a stage adds its own."""
    t = cfg.training
    return {
        "seed": cfg.seed,
        "strategy": cfg.scaling.strategy,
        "lora": to_dict(t.lora),
        "gradient_checkpointing": t.gradient_checkpointing,
        "batch_size": t.batch_size,
        "per_device_batch_size": t.per_device_batch_size,
        "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay,
        "warmup_ratio": t.warmup_ratio,
        "gradient_clipping": t.gradient_clipping,
        "total_steps": steps.total_steps,
        "steps_per_epoch": steps.steps_per_epoch,
        "checkpoint_every_steps": t.checkpoint_every_steps,
        "log_every_steps": t.log_every_steps,
        "pad_token_id": pad_token_id,
        "fail_at_step": t.fail_at_step,
        "output_dir": str(output_dir),
    }


def run_name(stage: str, cfg) -> str:
    """Same config -> same Ray Train run name -> a rerun resumes; fault injection does not count."""
    resumable = to_dict(cfg)
    resumable["training"]["fail_at_step"] = -1
    return f"{stage}-{hash_dict(resumable)}"


def fit(train_fn, config: dict, dataset, *, name: str, output_dir: Path, scaling, layout, callbacks=None):
    """Run ``train_fn`` on ``layout`` (``selectmoe.scaling.WorkerLayout``); returns the Result.

    Every worker reads the whole (small, materialised) dataset and takes its slice of each global
    batch itself (``selectmoe.training.common.step_batches``), so the dataset is not split.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**config, "cpu_threads": layout.cpu_threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=layout.workers, use_gpu=layout.use_gpu, resources_per_worker=layout.resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(output_dir / RAY_TRAIN_DIR),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()

"""Per-worker pieces shared by stage 1 (router pretraining) and stage 3 (LoRA finetuning).

Data order is a plan, not an accident of scheduling: every worker reads the same row stream (the
dataset is not split), applies the same seeded window shuffle per epoch, and takes its own slice of
each global batch. So the rows of step ``s`` do not depend on the number of workers (1 worker with
2 accumulation steps == 2 workers with 1), and a resumed run skips exactly the rows it has seen.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selectmoe.data.collate import count_labelled
from selectmoe.layout import METRICS, OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE
from selectmoe.training.sharding import restore_state

SHUFFLE_WINDOW_BATCHES = 64  # rows are shuffled within windows of this many global batches


# ---------------------------------------------------------------------------- batch plan


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut into per-worker micro-batches."""

    global_batch: int  # rows per optimiser step, as configured
    per_device: int
    world_size: int

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch // (self.per_device * self.world_size))

    @property
    def effective_batch(self) -> int:
        """Rows per optimiser step actually used: per_device x accumulation x workers."""
        return self.per_device * self.accumulation * self.world_size

    @property
    def is_exact(self) -> bool:
        """Whether the effective batch is the configured one (it is not when workers do not divide it)."""
        return self.effective_batch == self.global_batch

    def describe(self) -> str:
        return (
            f"effective batch {self.effective_batch} = per device {self.per_device} x accumulation "
            f"{self.accumulation} x workers {self.world_size}"
        )

    def steps_per_epoch(self, num_rows: int) -> int:
        return num_rows // self.effective_batch  # the last partial batch is dropped


def epoch_order(rows: Iterator[dict], seed: int, epoch: int, window: int) -> Iterator[dict]:
    """Seeded shuffle within consecutive windows of ``window`` rows: same on every worker, bounded memory."""
    buffer: list[dict] = []
    index = 0
    for row in rows:
        buffer.append(row)
        if len(buffer) == window:
            yield from _shuffled(buffer, seed, epoch, index)
            buffer, index = [], index + 1
    if buffer:
        yield from _shuffled(buffer, seed, epoch, index)


def _shuffled(buffer: list[dict], seed: int, epoch: int, index: int) -> list[dict]:
    random.Random(f"{seed}/{epoch}/{index}").shuffle(buffer)
    return buffer


def step_batches(rows: Iterator[dict], plan: BatchPlan, rank: int) -> Iterator[tuple[list[list[dict]], int]]:
    """Yield, per global step, this rank's micro-batches and the step's labelled-token count (all ranks)."""
    per_rank = plan.per_device * plan.accumulation
    step_rows: list[dict] = []
    for row in rows:
        step_rows.append(row)
        if len(step_rows) == plan.effective_batch:
            mine = step_rows[rank * per_rank : (rank + 1) * per_rank]
            micro = [mine[i : i + plan.per_device] for i in range(0, per_rank, plan.per_device)]
            yield micro, sum(count_labelled(r["labels"]) for r in step_rows)
            step_rows = []


# ---------------------------------------------------------------------------- optimisation


def build_optimizer(params, learning_rate: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW + linear warmup then linear decay to 0."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- checkpoints


def save_training_state(
    directory: Path, tensors: dict, optimizer_state: dict, scheduler, state: dict, metrics: list[dict]
) -> None:
    """Write a checkpoint from ``sharding.gather_state``'s full trainable tensors and optimizer state."""
    save_file(tensors, str(directory / TRAINABLE_FILE))
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, directory / OPTIMIZER_FILE
    )
    (directory / STATE_FILE).write_text(json.dumps(state))
    (directory / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def load_training_state(directory: Path, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    """Restore weights, optimizer and scheduler from a checkpoint (on every rank, DDP or FSDP)."""
    saved = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
    restore_state(model, optimizer, load_file(str(directory / TRAINABLE_FILE)), saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = json.loads((directory / STATE_FILE).read_text())
    metrics = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
    return state, metrics


def report(metrics: dict, checkpoint_writer=None) -> None:
    """``ray.train.report`` from every worker; only the writer (rank 0) attaches a checkpoint."""
    import ray.train

    if checkpoint_writer is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_writer(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def set_cpu_threads(threads: int | None) -> None:
    """In a CPU worker or actor (Train worker, scoring actor, eval task): run torch on ``threads``
    threads (``selectmoe.scaling.cpu_threads``); None = as is."""
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def worker_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()

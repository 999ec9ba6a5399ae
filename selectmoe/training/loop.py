"""The per-worker training loop of stages 1 and 3 (runs inside a Ray Train worker).

A stage builds its model (trainable parameters chosen, not yet wrapped) and a ``train_step`` that
runs forward/backward over this rank's micro-batches of one optimiser step and returns the step's
metrics reduced over ranks. ``run_training_loop`` owns the rest:

- wrapping (``sharding.wrap``: DDP by default, FSDP2 with ``scaling.strategy=fsdp``), AdamW with
  linear warmup/decay, gradient clipping;
- the deterministic step plan (``epoch_order`` + ``step_batches``), so a resumed run skips exactly
  the rows it has already trained on; the RNG is reseeded from (seed, step, rank) before every step,
  so dropout masks are the same whether or not the run restarted;
- checkpoints through ``ray.train.report`` every ``checkpoint_every_steps`` steps (0 = off), at the
  end of every epoch and at the last step (which also carries the PEFT adapter when asked): every
  rank gathers the full trainable state (a collective under FSDP), rank 0 writes it;
- resume from the latest checkpoint (after a worker failure, or on a rerun of the same config),
  marked by ``resumed_from_step`` in the metrics of the first step trained after it;
- ``fail_at_step`` fault injection (raises once, to test recovery).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from selectmoe.data.collate import collate
from selectmoe.layout import ADAPTER_DIR
from selectmoe.training.common import (
    SHUFFLE_WINDOW_BATCHES,
    BatchPlan,
    build_optimizer,
    epoch_order,
    load_training_state,
    report,
    save_training_state,
    step_batches,
    worker_device,
)
from selectmoe.training.sharding import gather_state, is_sharded, unwrap, wrap

FAILURE_MARKER = ".injected_failure_done"

# train_step(model, micro_batches, step_tokens, world_size) -> metrics reduced over ranks
TrainStep = Callable[[torch.nn.Module, list[dict[str, torch.Tensor]], int, int], dict]


def run_training_loop(
    model,
    config: dict,
    train_step: TrainStep,
    *,
    export_adapter: bool = False,
    probe: Callable[[torch.nn.Module], dict] | None = None,
    probe_every: int = 0,
    load_seconds: float | None = None,
) -> None:
    """Train ``model`` for ``config["total_steps"]`` optimiser steps; see the module docstring.

    ``probe(model) -> metrics`` runs every ``probe_every`` steps and at the last step, on rank 0 (on
    every rank under FSDP, whose forward all-gathers; rank 0's values are the ones reported); its
    latest values ride along in every later report (Tune's schedulers need the metric each time).
    ``load_seconds`` (the worker's model load) is reported as ``load_s`` with the first step it trains,
    beside ``torch_threads``."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    model.train()
    model = wrap(model, config["strategy"], world)
    params = [p for p in model.parameters() if p.requires_grad]

    plan = BatchPlan(config["batch_size"], config["per_device_batch_size"], world)
    total_steps, steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
    every = config["checkpoint_every_steps"]
    optimizer, scheduler = build_optimizer(
        params, config["learning_rate"], config["weight_decay"], total_steps, config["warmup_ratio"]
    )
    step, history = _resume(model, optimizer, scheduler)
    probed = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("probe_")}
    resumed_from = step or None  # recorded in the first step's metrics after a restart

    shard = ray.train.get_dataset_shard("train")
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        step_at_epoch_start = step
        rows = epoch_order(
            shard.iter_rows(), config["seed"], epoch, plan.effective_batch * SHUFFLE_WINDOW_BATCHES
        )
        for index, (micro_rows, step_tokens) in enumerate(step_batches(rows, plan, rank)):
            if index < skip:
                continue  # rows of steps finished before a restart
            if index >= steps_per_epoch or step >= total_steps:
                break
            _maybe_inject_failure(config, step)
            torch.manual_seed(_step_seed(config["seed"], step, rank))
            started = time.perf_counter()
            micro_batches = [collate(r, config["pad_token_id"], device) for r in micro_rows]
            metrics = train_step(model, micro_batches, step_tokens, world)
            torch.nn.utils.clip_grad_norm_(params, config["gradient_clipping"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            metrics.update(
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                lr=scheduler.get_last_lr()[0],
                step_s=seconds,
                tokens_per_s=metrics["tokens"] / max(seconds, 1e-9),
            )
            if load_seconds is not None:
                metrics.update(load_s=load_seconds, torch_threads=torch.get_num_threads())
                load_seconds = None
            if resumed_from is not None:
                metrics["resumed_from_step"], resumed_from = resumed_from, None
            if probe is not None and (rank == 0 or is_sharded(model)):
                if step == 1 or step == total_steps or (probe_every > 0 and step % probe_every == 0):
                    probed = probe(unwrap(model))
                metrics.update(probed)
            history.append(metrics)
            last = step == total_steps
            if last or step % steps_per_epoch == 0 or (every > 0 and step % every == 0):
                tensors, optimizer_state = gather_state(model, optimizer)  # on every rank
                writer = None
                if rank == 0:
                    writer = functools.partial(
                        _write_checkpoint,
                        model=unwrap(model),
                        tensors=tensors,
                        optimizer_state=optimizer_state,
                        scheduler=scheduler,
                        step=step,
                        history=history,
                        export_adapter=export_adapter and last,
                    )
                report(metrics, writer)
            elif step % config["log_every_steps"] == 0:
                report(metrics)
        if step == step_at_epoch_start:
            raise RuntimeError(
                f"epoch {epoch} yielded no training step; the dataset shard is smaller than planned"
            )


def all_reduce_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    """Sum a (CPU) tensor of per-rank metric sums over all ranks."""
    if world == 1:
        return values
    import torch.distributed as dist

    reduced = values.to(worker_device())
    dist.all_reduce(reduced)
    return reduced.cpu()


def _resume(model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """(steps done, metrics so far) from the latest checkpoint, restoring weights and optimiser state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as ckpt_dir:
        state, history = load_training_state(Path(ckpt_dir), model, optimizer, scheduler)
    return state["step"], history


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 4099 + rank


def _write_checkpoint(
    directory: Path, *, model, tensors, optimizer_state, scheduler, step, history, export_adapter
) -> None:
    save_training_state(directory, tensors, optimizer_state, scheduler, {"step": step}, history)
    if export_adapter:  # from the gathered tensors: under FSDP the model holds only this rank's shards
        model.save_pretrained(str(directory / ADAPTER_DIR), state_dict=tensors)


def _maybe_inject_failure(config: dict, step: int) -> None:
    """Fault injection for testing recovery: raise once at ``training.fail_at_step``."""
    if config["fail_at_step"] < 0 or step != config["fail_at_step"]:
        return
    marker = Path(config["output_dir"]) / FAILURE_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} (training.fail_at_step)")

"""Stage 1 per-worker loop: train the quality gates (and MoE routers) of Select-MoE.

Runs inside a Ray Train worker (``train_router_per_worker``); the driver is ``selectmoe.pretrain``.
Only router parameters train: ``full_rank`` = quality gates + MoE routers in fp32 (the frozen body
may be bf16); ``lora`` = PEFT LoRA on the MoE routers (``target_parameters``, since OLMoE's router is
a bare weight) with the quality gates fully trainable (``modules_to_save``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from selectmoe.models.loading import load_select_moe, resolve_dtype
from selectmoe.training.common import (
    SHUFFLE_WINDOW_BATCHES,
    BatchPlan,
    build_optimizer,
    collate,
    epoch_order,
    load_training_state,
    report,
    save_training_state,
    step_batches,
    worker_device,
)

ROUTER_PARAMS = ("mlp.gate.weight", "mlp.quality_gate.weight")
ADAPTER_DIR = "adapter"
FAILURE_MARKER = ".injected_failure_done"


def setup_trainable(model, peft_mode: str, lora: dict):
    """Freeze everything but the router parameters; keep the trainable ones in fp32."""
    if peft_mode == "full_rank":
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(ROUTER_PARAMS)
    elif peft_mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora.get("target_modules") or ["mlp.gate.weight"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["lora_alpha"],
                lora_dropout=lora["lora_dropout"],
                target_modules=[],
                target_parameters=targets,
                modules_to_save=["quality_gate"],
            ),
        )
    else:
        raise ValueError(f"training.peft_mode must be full_rank or lora, got {peft_mode!r}")
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 master weights for what trains
    return model


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train_router_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    device = worker_device()

    model = load_select_moe(
        config["base_model"],
        dtype=resolve_dtype(config["dtype"], device),
        attn_implementation=config["attn_implementation"],
        seed=config["seed"],
        **config["select_moe"],
    )
    model = setup_trainable(model, config["peft_mode"], config["lora"])
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    model = ray.train.torch.prepare_model(model, parallel_strategy=config["strategy"])
    params = [p for p in model.parameters() if p.requires_grad]

    plan = BatchPlan(config["batch_size"], config["per_device_batch_size"], world)
    total_steps = config["total_steps"]
    optimizer, scheduler = build_optimizer(
        params, config["learning_rate"], config["weight_decay"], total_steps, config["warmup_ratio"]
    )
    state, history = {"step": 0}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state, history = load_training_state(Path(ckpt_dir), _unwrap(model), optimizer, scheduler)

    coef = _unwrap(model).config.router_aux_loss_coef
    pad_id = config["pad_token_id"]
    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = config["steps_per_epoch"]
    step = state["step"]
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        step_at_epoch_start = step
        rows = epoch_order(
            shard.iter_rows(), config["seed"], epoch, plan.effective_batch * SHUFFLE_WINDOW_BATCHES
        )
        for index, (micro_batches, step_tokens) in enumerate(step_batches(rows, plan, rank)):
            if index < skip:
                continue  # rows of steps finished before a restart
            if index >= steps_per_epoch or step >= total_steps:
                break
            _maybe_inject_failure(config, step)
            started = time.perf_counter()
            metrics = _train_step(model, micro_batches, step_tokens, plan, coef, pad_id, device, world)
            torch.nn.utils.clip_grad_norm_(params, config["gradient_clipping"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            metrics.update(
                step=step,
                epoch=epoch,
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=metrics["tokens"] / max(seconds, 1e-9),
            )
            history.append(metrics)
            last = step == total_steps
            if step % config["checkpoint_every_steps"] == 0 or last:
                writer = None
                if rank == 0:
                    export = last and config["peft_mode"] == "lora"
                    writer = functools.partial(
                        _write_checkpoint,
                        model=_unwrap(model),
                        optimizer=optimizer,
                        scheduler=scheduler,
                        step=step,
                        history=history,
                        export_adapter=export,
                    )
                report(metrics, writer)
            elif step % config["log_every_steps"] == 0:
                report(metrics)
        if step == step_at_epoch_start:
            raise RuntimeError(
                f"epoch {epoch} yielded no training step; the dataset shard is smaller than planned"
            )


def _write_checkpoint(directory: Path, *, model, optimizer, scheduler, step, history, export_adapter) -> None:
    save_training_state(directory, model, optimizer, scheduler, {"step": step}, history)
    if export_adapter:
        model.save_pretrained(str(directory / ADAPTER_DIR))


def _train_step(model, micro_batches, step_tokens, plan, coef, pad_id, device, world) -> dict:
    """Forward/backward over this rank's micro-batches; returns step metrics reduced over ranks."""
    n_layers = _unwrap(model).config.num_hidden_layers
    sums = torch.zeros(4 + 3 * n_layers, dtype=torch.float64)  # lm, quality, lb, tokens, per-layer g, g^2, n
    for i, rows in enumerate(micro_batches):
        batch = collate(rows, pad_id, device)
        sync = i == len(micro_batches) - 1
        no_sync = model.no_sync if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext
        with no_sync():
            out = model(**batch, output_router_logits=True, num_items_in_batch=step_tokens)
            # lm_loss is this micro-batch's token sum / the step's labelled tokens on all ranks; DDP averages
            # gradients over ranks, hence x world. The quality loss is a mean per micro-batch.
            loss = world * out.lm_loss + coef * out.aux_loss / plan.accumulation
            loss.backward()
        sums[0] += out.lm_loss.item()
        sums[1] += out.quality_loss.item() / (plan.accumulation * world)
        if out.load_balancing_loss is not None:
            sums[2] += out.load_balancing_loss.item() / (plan.accumulation * world)
        mask = batch["attention_mask"].bool()
        sums[3] += mask.sum().item()
        with torch.no_grad():
            for layer, record in enumerate(out.router_logits):
                g = torch.sigmoid(record["quality_score"][..., 0].float())[mask]
                sums[4 + layer] += g.sum().item()
                sums[4 + n_layers + layer] += (g * g).sum().item()
                sums[4 + 2 * n_layers + layer] += g.numel()
    if world > 1:
        import torch.distributed as dist

        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    g_sum, g_sq, g_n = (sums[4 + k * n_layers : 4 + (k + 1) * n_layers] for k in range(3))
    g_mean = g_sum / g_n.clamp(min=1)
    g_std = (g_sq / g_n.clamp(min=1) - g_mean**2).clamp(min=0).sqrt()
    metrics = {
        "lm_loss": sums[0].item(),
        "quality_loss": sums[1].item(),
        "tokens": int(sums[3].item()),
        "gate_mean": [round(x, 6) for x in g_mean.tolist()],
        "gate_std": [round(x, 6) for x in g_std.tolist()],
    }
    if sums[2] > 0:
        metrics["load_balancing_loss"] = sums[2].item()
    return metrics


def _maybe_inject_failure(config: dict, step: int) -> None:
    """Fault-injection for testing recovery: raise once at ``training.fail_at_step``."""
    if config["fail_at_step"] < 0 or step != config["fail_at_step"]:
        return
    marker = Path(config["output_dir"]) / FAILURE_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} (training.fail_at_step)")

"""Stage 1 on a Ray Train worker: train the quality gates (and MoE routers) of Select-MoE.

``train_router_per_worker`` builds the model and its training step and hands both to the shared
loop (``selectmoe.training.loop``); the driver is ``selectmoe.pretrain.driver``.
Only router parameters train: ``full_rank`` = quality gates + MoE routers in fp32 (the frozen body
may be bf16); ``lora`` = PEFT LoRA on the MoE routers (``target_parameters``, since OLMoE's router is
a bare weight) with the quality gates fully trainable (``modules_to_save``). With
``training.reference_data`` a ``ReferenceLoss`` also trains the row score against trusted rows.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from selectmoe.metrics import auroc
from selectmoe.models.loading import load_select_moe, resolve_dtype
from selectmoe.select.score import ScorePasses, row_score, row_score_tensor, score_batch, score_mask
from selectmoe.training.common import BatchPlan, set_cpu_threads, worker_device
from selectmoe.training.loop import all_reduce_sum, run_training_loop
from selectmoe.training.sharding import gradient_sync, unwrap

ROUTER_PARAMS = ("mlp.gate.weight", "mlp.quality_gate.weight")


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


def train_router_per_worker(config: dict) -> None:
    set_cpu_threads(config["cpu_threads"])
    torch.manual_seed(config["seed"])
    started = time.perf_counter()
    model = load_select_moe(
        config["base_model"],
        dtype=resolve_dtype(config["dtype"], worker_device()),
        attn_implementation=config["attn_implementation"],
        seed=config["seed"],
        **config["select_moe"],
    )
    model = setup_trainable(model, config["peft_mode"], config["lora"])
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    reference = None
    if config.get("reference_class_weights"):
        import ray.train

        world = ray.train.get_context().get_world_size()
        reference = ReferenceLoss(
            weight=config["reference_loss_weight"],
            class_weights=config["reference_class_weights"],
            rows_per_step=BatchPlan(
                config["batch_size"], config["per_device_batch_size"], world
            ).effective_batch,
        )
    train_step = functools.partial(_train_step, coef=model.config.router_aux_loss_coef, reference=reference)
    probes = {
        key: config[rows]
        for key, rows in (("probe_auroc", "probe"), ("probe_reference_auroc", "reference_probe"))
        if config.get(rows)
    }
    probe = (
        functools.partial(probe_aurocs, probes=probes, pad_token_id=config["pad_token_id"])
        if probes
        else None
    )
    run_training_loop(
        model,
        config,
        train_step,
        export_adapter=config["peft_mode"] == "lora",
        probe=probe,
        probe_every=config.get("probe_every_steps", 0),
        load_seconds=time.perf_counter() - started,
    )


def probe_aurocs(model, *, probes: dict[str, list[dict]], pad_token_id: int, batch_size: int = 16) -> dict:
    """AUROC of the row scores (the stage-2 formula) on each probe's rows, ``clean`` rows positive:
    labelled corpus rows (``probe_auroc``), held-out reference rows against corpus rows
    (``probe_reference_auroc``)."""
    was_training = model.training
    model.eval()
    metrics = {}
    for key, rows in probes.items():
        scores = []
        for start in range(0, len(rows), batch_size):
            columns = score_batch(model, rows[start : start + batch_size], ScorePasses(), pad_token_id)
            scores.extend(row_score(columns["layer_scores"]).tolist())
        metrics[key] = auroc(np.asarray(scores), np.asarray([r["clean"] for r in rows]))
    model.train(was_training)
    return metrics


@dataclass(frozen=True)
class ReferenceLoss:
    """Class-balanced BCE that pushes the row score (the stage-2 formula) to 1 on trusted reference rows
    and to 0 on corpus rows (``training.reference_data``): the corpus's clean rows look like the reference,
    so the gates learn what sets its other rows apart. Normalised by the rows of a whole step."""

    weight: float
    class_weights: dict[str, float]  # {"reference": w, "corpus": w}: equal total weight per class
    rows_per_step: int

    def __call__(self, out, batch: dict, reference: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step's loss (a sum over its rows / rows per step)."""
        mask = score_mask(batch["attention_mask"], batch["labels"], "assistant")
        scores = row_score_tensor([r["quality_score"] for r in out.router_logits], mask).clamp(1e-6, 1 - 1e-6)
        target = reference.float()
        row_weights = torch.where(reference, self.class_weights["reference"], self.class_weights["corpus"])
        bce = torch.nn.functional.binary_cross_entropy(scores, target, weight=row_weights, reduction="sum")
        return bce / self.rows_per_step


def _train_step(
    model, micro_batches, step_tokens, world, *, coef, reference: ReferenceLoss | None = None
) -> dict:
    """Forward/backward over this rank's micro-batches; returns step metrics reduced over ranks."""
    n_layers = unwrap(model).config.num_hidden_layers
    accumulation = len(micro_batches)
    # lm, quality, load balancing, tokens, reference loss; then per layer: gate sum, gate^2 sum, count
    sums = torch.zeros(5 + 3 * n_layers, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        is_reference = batch.pop("reference", None)
        with gradient_sync(model, last_micro_batch=i == accumulation - 1):
            out = model(**batch, output_router_logits=True, num_items_in_batch=step_tokens)
            # lm_loss is this micro-batch's token sum / the step's labelled tokens on all ranks; DDP and FSDP
            # average gradients over ranks, hence x world (the reference loss likewise, per row). The
            # quality loss is a mean per micro-batch.
            loss = world * out.lm_loss + coef * out.aux_loss / accumulation
            if reference is not None:
                reference_loss = reference(out, batch, is_reference)
                loss = loss + world * reference.weight * reference_loss
                sums[4] += reference_loss.item()
            loss.backward()
        sums[0] += out.lm_loss.item()
        sums[1] += out.quality_loss.item() / (accumulation * world)
        if out.load_balancing_loss is not None:
            sums[2] += out.load_balancing_loss.item() / (accumulation * world)
        mask = batch["attention_mask"].bool()  # (B, T)
        sums[3] += mask.sum().item()
        with torch.no_grad():
            for layer, record in enumerate(out.router_logits):
                g = torch.sigmoid(record["quality_score"][..., 0].float())[mask]  # (tokens,)
                sums[5 + layer] += g.sum().item()
                sums[5 + n_layers + layer] += (g * g).sum().item()
                sums[5 + 2 * n_layers + layer] += g.numel()
    sums = all_reduce_sum(sums, world)
    g_sum, g_sq, g_n = (sums[5 + k * n_layers : 5 + (k + 1) * n_layers] for k in range(3))
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
    if reference is not None:
        metrics["reference_loss"] = sums[4].item()
    return metrics

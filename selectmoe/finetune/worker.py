"""Stage 3 on a Ray Train worker: LoRA-finetune the target causal LM (Llama-2-7B by default).

``train_target_per_worker`` loads the target (bf16 on GPU with ``model.dtype=auto``), wraps it in a
PEFT LoRA adapter (LESS: r=128, alpha=512, dropout 0.1 on q/k/v/o_proj) and hands it with its
training step to the shared loop (``selectmoe.training.loop``), which exports the adapter with the
last checkpoint. The driver is ``selectmoe.finetune.driver``.
"""

from __future__ import annotations

import time

import torch

from selectmoe.models.loading import resolve_dtype
from selectmoe.training.common import set_cpu_threads, worker_device
from selectmoe.training.loop import all_reduce_sum, run_training_loop
from selectmoe.training.sharding import gradient_sync

LESS_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # when training.lora.target_modules is null


def load_target(name: str, *, dtype: str, attn_implementation: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name,
        dtype=resolve_dtype(dtype, worker_device()),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )


def apply_lora(model, lora: dict, *, gradient_checkpointing: bool):
    """Freeze the target and add a LoRA adapter (PEFT keeps the adapter weights in fp32)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        # non-reentrant: LoRA weights inside a checkpointed layer get gradients although the frozen
        # embeddings' output needs none (reentrant checkpointing would need enable_input_require_grads),
        # and it works under DDP and FSDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"] or list(LESS_TARGETS),
    )
    return get_peft_model(model, config)


def train_target_per_worker(config: dict) -> None:
    set_cpu_threads(config["cpu_threads"])
    torch.manual_seed(config["seed"])  # the same LoRA init on every worker
    started = time.perf_counter()
    model = load_target(
        config["model_name"],
        dtype=config["dtype"],
        attn_implementation=config["attn_implementation"],
        trust_remote_code=config["trust_remote_code"],
    )
    model = apply_lora(model, config["lora"], gradient_checkpointing=config["gradient_checkpointing"])
    run_training_loop(
        model, config, _train_step, export_adapter=True, load_seconds=time.perf_counter() - started
    )


def _train_step(model, micro_batches, step_tokens, world) -> dict:
    """Forward/backward over this rank's micro-batches; returns step metrics reduced over ranks.

    The loss is token-normalised over the whole global batch: each micro-batch's loss is its token sum
    / the step's labelled tokens on all ranks (``num_items_in_batch``), and DDP and FSDP average
    gradients over ranks, hence x world. Long and short rows weigh by their labelled tokens, as in one
    big batch.
    """
    sums = torch.zeros(2, dtype=torch.float64)  # loss, tokens
    for i, batch in enumerate(micro_batches):  # batch tensors: (B, T)
        with gradient_sync(model, last_micro_batch=i == len(micro_batches) - 1):
            out = model(**batch, num_items_in_batch=step_tokens)
            (world * out.loss).backward()
        sums[0] += out.loss.item()
        sums[1] += batch["attention_mask"].sum().item()
    sums = all_reduce_sum(sums, world)
    return {"loss": sums[0].item(), "tokens": int(sums[1].item()), "labelled_tokens": step_tokens}

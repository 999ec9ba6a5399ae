"""How a stage's model is spread over the Ray Train workers: DDP (default) or FSDP2, and the state
that checkpoints carry in one format for both.

- ``scaling.strategy=ddp``: Ray's ``prepare_model`` (``DistributedDataParallel``; no wrapper on one
  worker).
- ``scaling.strategy=fsdp``: PyTorch FSDP2, ``fully_shard`` on every decoder layer, then on the root
  (embeddings, final norm, LM head). FSDP2 does not wrap: the model keeps its class, names and
  ``forward``, its parameters become sharded DTensors. A unit's trainable parameters must share one
  dtype (they are all fp32 here); frozen ones may differ (a bf16 body), FSDP2 all-gathers a unit of
  mixed dtypes as bytes. So a layer and its trainable routers / LoRA factors stay one unit, which
  PEFT's LoRA on a bare parameter (``target_parameters``) needs: it reads its factors' weights
  without calling their modules, so they could not be units of their own. On one worker there is
  nothing to shard and the model runs unwrapped, as under DDP.

Checkpoint state is gathered to full CPU tensors named as in the unwrapped model, whatever the
strategy (``torch.distributed.checkpoint.state_dict``), so checkpoints and the outputs made from
them do not depend on it.
"""

from __future__ import annotations

import contextlib

import torch

# torch.distributed.fsdp / .checkpoint are imported where used: together they take ~1.5 s to import


def wrap(model, strategy: str, world: int):
    """The model ready for data-parallel training on this worker (see the module docstring)."""
    import ray.train.torch

    if strategy == "fsdp" and world > 1:
        return shard(ray.train.torch.prepare_model(model, parallel_strategy=None))  # device placement only
    return ray.train.torch.prepare_model(model)


def shard(model):
    """FSDP2 units: every decoder layer, then the root (the rest)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(model)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    """The model inside a DDP wrapper, else the model itself (FSDP2 does not wrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def gradient_sync(model, last_micro_batch: bool):
    """Reduce gradients over ranks only after the last micro-batch of a step: a context for DDP's
    ``no_sync``; FSDP2 takes a flag, set here for the backward that follows."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def gather_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors in fp32, optimizer state keyed by parameter name): full CPU tensors on rank 0,
    empty elsewhere. Gathering FSDP shards is a collective: every rank must call this."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # full tensors on rank 0's CPU (other ranks get {}); frozen parameters are neither gathered nor saved
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    tensors = get_model_state_dict(model, options=options)
    tensors = {n: t.float().contiguous() for n, t in tensors.items() if n in trainable}
    return tensors, get_optimizer_state_dict(model, optimizer, options=options)


def restore_state(model, optimizer, tensors: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load what ``gather_state`` saved (every rank passes the full state; FSDP keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

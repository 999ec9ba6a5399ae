"""Loading OLMoE checkpoints into Select-MoE, and the standalone conversion.

An OLMoE checkpoint (hub id or folder; the published per-expert layout or transformers' fused one)
loads straight into ``SelectMoeForCausalLM``: every tensor keeps its name, only the quality gates are
new. They are initialised here from the config's mean/std with a seeded generator, so
``quality_gate_init_mean=...`` overrides take effect at load time (in the seed they did nothing).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from selectmoe.config import ConfigError
from selectmoe.layout import STAGE1_CONFIG
from selectmoe.models.configuration import SelectMoeConfig
from selectmoe.models.modeling import SelectMoeForCausalLM, gates_forced, init_quality_gate

logger = logging.getLogger(__name__)

_CONFIG_DROP = ("model_type", "architectures", "transformers_version", "auto_map")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 elsewhere; otherwise a torch dtype name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    resolved = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, bfloat16, float16 or float32")
    return resolved


def select_moe_config(path: str, trust_remote_code: bool = False, **overrides) -> SelectMoeConfig:
    """The Select-MoE config for an OLMoE or Select-MoE checkpoint, with ``overrides`` applied."""
    base = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if base.model_type not in ("olmoe", "select_moe"):
        raise ValueError(
            f"{path}: expected an OLMoE or Select-MoE checkpoint, got model_type={base.model_type!r}"
        )
    values = {k: v for k, v in base.to_dict().items() if k not in _CONFIG_DROP}
    values.update(overrides)
    values.setdefault("output_router_logits", True)
    if base.model_type == "olmoe":
        values["output_router_logits"] = overrides.get("output_router_logits", True)
    return SelectMoeConfig(**values)


def load_select_moe(
    path: str,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    trust_remote_code: bool = False,
    keep_base_weights: bool = False,
    **config_overrides,
) -> SelectMoeForCausalLM:
    """Load an OLMoE or Select-MoE checkpoint, or a stage-1 output folder, as ``SelectMoeForCausalLM``.

    New gates get a seeded init. A stage-1 folder (it holds ``select_moe_config.json``) names its base
    model; the base is loaded and the trained router weights or LoRA adapter applied on top. With
    ``keep_base_weights`` the model's ``base_weights`` holds the base's values of every tensor stage 1
    changed but the quality gates (the routers: ~2M parameters at OLMoE-1B-7B's shape; none for a
    checkpoint that is not a stage-1 folder), for ``modeling.base_model_view``.
    """
    stage1 = stage1_record(path)
    if stage1 is not None:
        return _load_stage1_output(
            Path(path),
            stage1,
            dtype,
            attn_implementation,
            trust_remote_code,
            keep_base_weights,
            config_overrides,
        )
    config = select_moe_config(path, trust_remote_code=trust_remote_code, **config_overrides)
    # transformers warns that the gates are "newly initialized ... consider training": expected here
    # (they are initialised below, then trained or overwritten by stage 1), and every other missing or
    # unexpected key is an error below, so its report is muted and one INFO line says what happened
    loader = logging.getLogger("transformers.modeling_utils")  # it logs the load report
    mute = _DropLoadReport()
    loader.addFilter(mute)
    try:
        state_dict = _read_not_mapped(path)
        # transformers reads a checkpoint's tensors in 4 threads ahead of the loop that fuses and places
        # them, unbounded: from files in the page cache the reads race ahead and hold much of the model
        # twice (at OLMoE-1B-7B's shape a Train worker at 1.53x the weights, 1.13x read in order;
        # benchmarks/README.md, real shapes)
        with environment_variable("HF_DEACTIVATE_ASYNC_LOAD", "1"):
            model, info = SelectMoeForCausalLM.from_pretrained(
                None if state_dict is not None else path,
                config=config,
                state_dict=state_dict,
                dtype=resolve_dtype(dtype),
                attn_implementation=attn_implementation,
                output_loading_info=True,
                trust_remote_code=trust_remote_code,
            )
        del state_dict  # its file handles close with it
    finally:
        loader.removeFilter(mute)
    release_freed_memory()  # the read slices and the per-expert copies fused away
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    not_gates = [k for k in missing if not k.endswith("mlp.quality_gate.weight")]
    if not_gates or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match Select-MoE/OLMoE: missing {not_gates[:5]}, unexpected {unexpected[:5]}"
        )
    if missing:
        generator = torch.Generator().manual_seed(seed)
        for layer in model.model.layers:
            init_quality_gate(layer.mlp.quality_gate, config, generator)
        logger.info(
            "initialised %d new quality gates (mean %s, std %s, seed %d)",
            len(missing),
            config.quality_gate_init_mean,
            config.quality_gate_init_std,
            seed,
        )
    if keep_base_weights:
        model.base_weights = {}
    return model


def stage1_record(path: str | Path) -> dict | None:
    """What a stage-1 output folder records (base model, tokenizer, seed, gate config, weights file),
    or None when ``path`` is not one."""
    record = Path(path) / STAGE1_CONFIG
    return json.loads(record.read_text()) if record.is_file() else None


def weight_bytes(path: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> int:
    """Bytes the weights of ``path`` (as ``load_select_moe`` reads it) take in ``dtype`` on ``device``,
    from the config alone: the model is built on the meta device, no tensor is read."""
    overrides = {}
    stage1 = stage1_record(path)
    if stage1 is not None:
        path, overrides = stage1["base_model"], stage1.get("select_moe", {})
    config = select_moe_config(path, **overrides)
    with torch.device("meta"):
        model = SelectMoeForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * resolve_dtype(dtype, device).itemsize


def _read_not_mapped(path: str) -> dict | None:
    """The checkpoint's tensors as lazy slices read with ``pread`` into memory of their own (None when
    it has no safetensors files: transformers then loads it its own way).

    transformers memory-maps safetensors files. It fuses a per-expert checkpoint's experts (the
    published OLMoE layout) into new tensors and leaves the other tensors views of the mapped files;
    those views keep every file mapped, so the expert pages read during the load stay resident beside
    the fused copies: at OLMoE-1B-7B's shape a load peaked at 20.4 GiB of RSS for 12.9 GiB of weights
    (benchmarks/README.md, real shapes). Read, not mapped, each tensor is held once. A hub id is
    resolved to its local snapshot first (downloaded if need be, as transformers would)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    handles = [safe_open(str(folder / f), framework="pt", device="cpu", backend="pread") for f in files]
    return {key: handle.get_slice(key) for handle in handles for key in handle.keys()}


@contextmanager
def environment_variable(name: str, value: str, *, unless_set: bool = False):
    """``name=value`` in this process's environment for the block (left as it is with ``unless_set`` when
    it is set), then as before, so that processes started later do not inherit it."""
    before = os.environ.get(name)
    if not (unless_set and before is not None):
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def release_freed_memory() -> None:
    """Hand the heap memory glibc keeps after frees back to the OS (``malloc_trim``; no-op elsewhere).

    glibc raises its mmap threshold after large frees and then serves tensors of up to 32 MB from heaps
    it does not shrink: loading OLMoE-1B-7B left 2 GiB of freed memory resident, and each new batch
    shape of CPU scoring another ~0.5 GiB (6.6 GiB above the weights after 138 rows), all of it
    counted by RSS and by Ray's memory monitor (benchmarks/README.md, real shapes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _load_stage1_output(
    folder: Path, info: dict, dtype, attn_implementation, trust_remote_code, keep_base_weights, overrides
):
    model = load_select_moe(
        info["base_model"],
        dtype=dtype,
        attn_implementation=attn_implementation,
        seed=info.get("seed", 0),
        trust_remote_code=trust_remote_code,
        **{**info.get("select_moe", {}), **overrides},
    )
    weights = folder / info["weights"]
    if weights.is_dir():  # a PEFT adapter: merge it so scoring runs the plain model
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, str(weights))
        if keep_base_weights:  # what merging changes: the base layers the adapter wraps
            model.base_weights = {
                name.removeprefix("base_model.model.").replace(".base_layer.", "."): param.detach().clone()
                for name, param in adapted.named_parameters()
                if ".base_layer." in name
            }
        return adapted.merge_and_unload()
    params = dict(model.named_parameters())
    tensors = load_file(str(weights))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{weights}: tensors not in the model: {unknown[:5]}")
    if keep_base_weights:
        model.base_weights = {
            name: params[name].detach().clone()
            for name in tensors
            if not name.endswith("quality_gate.weight")
        }
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def convert_olmoe(olmoe: str, out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Write a standalone Select-MoE checkpoint (safetensors + tokenizer) from an OLMoE checkpoint."""
    out = Path(out_dir)
    model = load_select_moe(olmoe, dtype="float32", seed=seed, **config_overrides)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(olmoe).save_pretrained(str(out))
    return out


def max_logit_diff_gates_open(
    olmoe: str, select_moe: str, seed: int = 0, batch: int = 2, seq: int = 16
) -> float:
    """Max |logits(OLMoE) - logits(Select-MoE with every gate forced open)| in fp32 on random tokens."""
    from transformers import OlmoeForCausalLM

    reference = OlmoeForCausalLM.from_pretrained(olmoe, dtype=torch.float32).eval()
    candidate = load_select_moe(select_moe, dtype="float32").eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, reference.config.vocab_size, (batch, seq), generator=generator)
    with torch.inference_mode(), gates_forced(candidate, 1.0):
        expected = reference(input_ids=input_ids).logits
        got = candidate(input_ids=input_ids, output_router_logits=False).logits
    return (expected - got).abs().max().item()


def require_model(key: str, path: str) -> None:
    """Fail at once, naming ``key``, when ``path`` is neither a model folder (a Hugging Face folder,
    a stage-1 output or a PEFT adapter) nor a hub id (``org/name``, left to the hub)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        markers = ("config.json", STAGE1_CONFIG, "adapter_config.json")
        if not any((folder / name).is_file() for name in markers):
            raise ConfigError(f"{key}={path}: not a model folder (it has none of {', '.join(markers)})")
    elif folder.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise ConfigError(f"{key}={path}: no such model folder, and not a hub id (org/name)")

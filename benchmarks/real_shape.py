"""Real-shape checkpoints, offline: OLMoE-1B-7B and Llama-2-7B with random bf16 weights.

    .venv/bin/python benchmarks/real_shape.py build /data/real_shape          # ~14 GB each, low memory
    .venv/bin/python benchmarks/real_shape.py build /tmp/mini --shape mini    # the same code, tiny (CI)

``build OUT`` writes ``OUT/olmoe-1b-7b`` (the published OLMoE-1B-7B config, per-expert tensor names
as on the hub: ``mlp.experts.E.{gate,up,down}_proj.weight``) and ``OUT/llama-2-7b``, each a normal
Hugging Face folder of sharded safetensors with ``model.safetensors.index.json`` and the offline
32k tokenizer (the models keep their real vocabulary sizes). Tensors are generated one shard at a time
from the shapes of a model built on the meta device, so the peak memory is one shard (~2 GB) and
never a copy of the model; norms are ones, the rest N(0, 0.02), seeded. Prints and writes (``--json``)
the seconds and bytes of each build.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from common import LLAMA_2_7B, OLMOE_1B_7B, write_json
from safetensors.torch import save_file

from selectmoe.demo.tiny import build_tokenizer

SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02

# the same code paths at a size CI builds in seconds
MINI = {
    "olmoe": dict(
        OLMOE_1B_7B,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "llama": dict(
        LLAMA_2_7B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the two real-shape checkpoints")
    build.add_argument("out", type=Path)
    build.add_argument("--shape", choices=("real", "mini"), default="real")
    build.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1024**3)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--json", default=None)
    args = p.parse_args()
    results = build_checkpoints(args.out, args.shape, int(args.shard_gb * 1024**3), args.seed)
    for name, r in results["models"].items():
        print(
            f"{name}: {r['parameters'] / 1e9:.2f}B parameters, {r['bytes'] / 1e9:.2f} GB in {r['shards']} "
            f"shards, built in {r['seconds']:.0f} s"
        )
    print(f"peak RSS of this process: {results['peak_rss_gb']:.2f} GB")
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, **results})
    return 0


def build_checkpoints(out: Path, shape: str, shard_bytes: int, seed: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, OlmoeConfig, OlmoeForCausalLM

    olmoe = MINI["olmoe"] if shape == "mini" else OLMOE_1B_7B
    llama = MINI["llama"] if shape == "mini" else LLAMA_2_7B
    tokenizer = build_tokenizer()
    results: dict = {"models": {}}
    for name, cls, config in (
        ("olmoe-1b-7b", OlmoeForCausalLM, OlmoeConfig(**olmoe)),
        ("llama-2-7b", LlamaForCausalLM, LlamaConfig(**llama)),
    ):
        started = time.time()
        folder = out / name
        results["models"][name] = write_random_checkpoint(cls, config, folder, shard_bytes, seed)
        tokenizer.save_pretrained(str(folder))
        results["models"][name]["seconds"] = time.time() - started
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return results


def write_random_checkpoint(cls, config, folder: Path, shard_bytes: int, seed: int) -> dict:
    """Shapes from a meta-device model; tensors generated and written one shard at a time."""
    with torch.device("meta"):
        model = cls(config)
    shapes = [(name, tuple(t.shape)) for name, t in published_names(model.state_dict().items())]
    folder.mkdir(parents=True, exist_ok=True)
    config.dtype = "bfloat16"
    config.save_pretrained(str(folder))
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_size, index, total, files = 0, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, files[-1]))
            shard, shard_size = {}, 0

    for name, size in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(size, generator=generator) * INIT_STD).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard_size + nbytes > shard_bytes:
            flush()
        shard[name], shard_size, total = tensor, shard_size + nbytes, total + nbytes
    flush()
    final = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    weight_map = {name: final[f] for name, f in index.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return {"parameters": total // 2, "bytes": total, "shards": len(files)}


def published_names(items):
    """transformers' fused expert tensors -> the hub's per-expert names and shapes:
    ``experts.gate_up_proj`` (E, 2I, H) -> ``experts.e.gate_proj.weight`` and ``up_proj`` (I, H);
    ``experts.down_proj`` (E, H, I) -> ``experts.e.down_proj.weight`` (H, I)."""
    for name, tensor in items:
        if name.endswith("mlp.experts.gate_up_proj"):
            experts, double, hidden = tensor.shape
            for e in range(experts):
                for part in ("gate_proj", "up_proj"):
                    yield (
                        f"{name[: -len('gate_up_proj')]}{e}.{part}.weight",
                        torch.empty(double // 2, hidden, device="meta"),
                    )
        elif name.endswith("mlp.experts.down_proj"):
            experts, hidden, inner = tensor.shape
            for e in range(experts):
                yield (
                    f"{name[: -len('down_proj')]}{e}.down_proj.weight",
                    torch.empty(hidden, inner, device="meta"),
                )
        else:
            yield name, tensor


if __name__ == "__main__":
    sys.exit(main())

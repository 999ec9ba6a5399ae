"""Real shapes through every stage: OLMoE-1B-7B and Llama-2-7B with random bf16 weights, offline.

    .venv/bin/python benchmarks/real_shape.py build /data/real_shape          # ~14 GB each, low memory
    .venv/bin/python benchmarks/real_shape.py build /tmp/mini --shape mini    # the same code, tiny (CI)
    .venv/bin/python benchmarks/real_shape.py run /data/real_shape --json results/real_shape_run.json
    .venv/bin/python benchmarks/real_shape.py run /tmp/mini --rows 24 --throughput-rows 8   # CI size

``build OUT`` writes ``OUT/olmoe-1b-7b`` (the published OLMoE-1B-7B config, per-expert tensor names
as on the hub: ``mlp.experts.E.{gate,up,down}_proj.weight``) and ``OUT/llama-2-7b``, each a normal
Hugging Face folder of sharded safetensors with ``model.safetensors.index.json`` and the offline
32k tokenizer (the models keep their real vocabulary sizes). Tensors are generated one shard at a time
from the shapes of a model built on the meta device, so the peak memory is one shard (~2 GB) and
never a copy of the model; norms are ones, the rest N(0, 0.02), seeded. Prints and writes (``--json``)
the seconds and bytes of each build.

``run MODELS`` runs the product's CLI on them, one stage at a time, each in its own local Ray (run it
alone on the machine): ``selectmoe pretrain`` (full_rank, then lora; max length 512, gradient
checkpointing), ``selectmoe select`` on real rows from ``../shared/data/train`` (the default preset's
scoring), ``selectmoe finetune`` of the Llama shape (LESS's LoRA r=128 on q/k/v/o) on the selection,
and ``selectmoe evaluate`` with ``eval.limit`` on one offline task, all with ``dtype=bfloat16``.
While a stage runs, every process of its tree is sampled (VmHWM, RssAnon, RssFile from /proc, every
0.2 s) and named by its Ray role (driver, Train worker, scoring actor, eval task). Per stage it reports
the peak RSS of each process, the model load and step seconds (the product's own metrics), and the
bytes the stage writes. Then ``throughput``: in one process, on the same rows and the same bf16 model,
after a warm-up pass over every batch shape, each in turn: a seed-style loop (corpus order, batches of 32 padded to the longest row, full forward
with the LM head) and the product's ``GateScorer`` with the original preset's scoring (gates, one
pass) and the default preset's (the gates, then NLL + prompt gain under the base model: three passes);
real tokens/s, their ratios, and the
useful FLOPs (real tokens, the passes a score needs) per second as a share of the bf16 matmul peak
measured in the same run. ``--device cuda`` runs the same on one GPU (stages with
``scaling.use_gpu=true``; the throughput loops on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    LLAMA_2_7B,
    OLMOE_1B_7B,
    TRAIN_DIR,
    decoder_flops_per_row,
    matmul_peak,
    print_table,
    sample_rows,
    timed,
    write_json,
)
from safetensors.torch import save_file

from selectmoe.config import PipelineConfig, load_preset
from selectmoe.demo.tiny import build_tokenizer

MODELS = ("olmoe-1b-7b", "llama-2-7b")
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the two real-shape checkpoints")
    build.add_argument("out", type=Path)
    build.add_argument("--shape", choices=("real", "mini"), default="real")
    build.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1024**3)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    build.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a saved tokenizer folder, loaded and saved into each checkpoint (default: the offline 32k one)",
    )
    build.add_argument("--json", default=None)
    run = sub.add_parser("run", help="every stage's CLI on the checkpoints `build` wrote, then throughput")
    run.add_argument("models", type=Path, help="the folder `build` wrote")
    run.add_argument("--work", type=Path, default=None, help="stage outputs (default MODELS/runs)")
    run.add_argument("--data-dir", type=Path, default=TRAIN_DIR)
    run.add_argument("--rows", type=int, default=150, help="real rows the stages read")
    run.add_argument("--throughput-rows", type=int, default=64)
    run.add_argument("--max-length", type=int, default=512)
    run.add_argument(
        "--tokens-per-batch",
        type=int,
        default=0,
        help="the product scorer's scoring.tokens_per_batch in throughput (0 = its default for the device)",
    )
    run.add_argument(
        "--max-rows",
        type=positive_int,
        nargs="+",
        default=None,
        help="the product scorer's rows per sub-batch (data_process.batch_size) in throughput (default: its "
        "default for the device); several values each run the two presets",
    )
    run.add_argument("--steps", type=int, default=3, help="optimiser steps of stages 1 and 3")
    run.add_argument("--eval-limit", type=int, default=10)
    run.add_argument("--stages", nargs="+", default=list(STAGES) + ["throughput"])
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", default=None)
    args = p.parse_args()
    if args.command == "run":
        return run_all(args)
    results = build_checkpoints(
        args.out, args.shape, int(args.shard_gb * 1024**3), args.seed, args.models, args.tokenizer
    )
    for name, r in results["models"].items():
        print(
            f"{name}: {r['parameters'] / 1e9:.2f}B parameters, {r['bytes'] / 1e9:.2f} GB in {r['shards']} "
            f"shards, built in {r['seconds']:.0f} s"
        )
    print(f"peak RSS of this process: {results['peak_rss_gb']:.2f} GB")
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, **results})
    return 0


def build_checkpoints(
    out: Path, shape: str, shard_bytes: int, seed: int, models=MODELS, tokenizer_dir: Path | None = None
) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OlmoeConfig, OlmoeForCausalLM

    olmoe = MINI["olmoe"] if shape == "mini" else OLMOE_1B_7B
    llama = MINI["llama"] if shape == "mini" else LLAMA_2_7B
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else build_tokenizer()
    results: dict = {"models": {}}
    for name, cls, config in (
        ("olmoe-1b-7b", OlmoeForCausalLM, OlmoeConfig(**olmoe)),
        ("llama-2-7b", LlamaForCausalLM, LlamaConfig(**llama)),
    ):
        if name not in models:
            continue
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


# ---------------------------------------------------------------------------- run: stages through the CLI

STAGES = ("pretrain_full_rank", "pretrain_lora", "select", "finetune", "evaluate")
SEED_BATCH = 32
# the default preset's scoring keys: the trained gates' pass, and the base model's over the full rows and
# over the replies alone (scoring.nll_model=base; results before it have two passes, the stage-1 model's)
DEFAULT_SCORING = load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"]
# what the seed project states each stage needs (GPU memory), beside the measured peaks
SEED_STATED_GB = {"pretrain_full_rank": 16, "pretrain_lora": 8, "finetune": 24}
ROLES = (  # Ray's process titles -> the role in the table
    ("RayTrainWorker", "Train worker"),
    ("GateScorer", "scoring actor"),
    ("_run_jobs_remote", "eval task"),
)


def run_all(args) -> int:
    work = args.work or args.models / "runs"
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.jsonl"
    rows = sample_rows(args.data_dir, args.rows, args.seed)
    rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    olmoe, llama = args.models / "olmoe-1b-7b", args.models / "llama-2-7b"
    earlier = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    results: dict = {  # a run of some --stages updates an earlier run's file
        **earlier,
        "args": {k: str(v) for k, v in vars(args).items()},
        "model_bytes": {
            m.name: sum(f.stat().st_size for f in m.glob("*.safetensors")) for m in (olmoe, llama)
        },
        "stages": earlier.get("stages", {}),
    }
    gpu = [f"scaling.use_gpu={str(args.device == 'cuda').lower()}"]
    common = [f"dataset.max_sequence_length={args.max_length}", "seed=0"]
    commands = {
        "pretrain_full_rank": [
            "pretrain",
            f"selector_model.path={olmoe}",
            "selector_model.dtype=bfloat16",
            f"dataset.data_path=[{rows_file}]",
            "dataset.subset_ratio=1",
            "training.peft_mode=full_rank",
            f"training.max_steps={args.steps}",
            "training.batch_size=2",
            "training.gradient_checkpointing=true",
        ],
        "pretrain_lora": [
            "pretrain",
            f"selector_model.path={olmoe}",
            "selector_model.dtype=bfloat16",
            f"dataset.data_path=[{rows_file}]",
            "dataset.subset_ratio=1",
            "training.peft_mode=lora",
            f"training.max_steps={args.steps}",
            "training.batch_size=2",
            "training.gradient_checkpointing=true",
        ],
        "select": [
            "select",
            f"model_checkpoint_path={work / 'pretrain_full_rank'}",
            "selector_model.dtype=bfloat16",
            f"dataset.data_path=[{rows_file}]",
            "selection_percentage=0.1",
            "selection.exclude_training_rows=false",  # stage 1 read the same rows
            *(f"scoring.{k}={v}" for k, v in DEFAULT_SCORING.items()),
        ],
        "finetune": [
            "finetune",
            f"model.name={llama}",
            "model.dtype=bfloat16",
            f"dataset.data_path=[{work / 'select' / 'selected.jsonl'}]",
            f"training.max_steps={args.steps}",
            "training.batch_size=2",
        ],
        "evaluate": [
            "evaluate",
            f"model.name={llama}",
            "model.dtype=bfloat16",
            f"eval.adapter={work / 'finetune'}",
            "eval.tasks=[arc_challenge]",
            f"eval.data_dir={args.data_dir.parent / 'eval'}",
            f"eval.limit={args.eval_limit}",
        ],
    }
    for stage in (s for s in STAGES if s in args.stages):
        out = work / stage
        shutil.rmtree(out, ignore_errors=True)  # else the stage resumes an earlier run's checkpoint or parts
        argv = [sys.executable, "-m", "selectmoe.cli", *commands[stage], f"output_dir={out}"]
        argv += gpu + (common if stage != "evaluate" else [])
        print(f"\n$ selectmoe {' '.join(argv[3:])}", flush=True)
        watched = run_watched(argv)
        results["stages"][stage] = {**watched, **stage_numbers(stage, out)}
        print_stage(stage, results["stages"][stage])
        write_json(args.json, results)
        if watched["rc"] != 0:
            print(f"{stage} failed (rc {watched['rc']}); see {out}/logs/console.log")
            return 1
    if "throughput" in args.stages:
        results["throughput"] = throughput(args, olmoe, rows)
        print_throughput(results["throughput"])
    print_markdown(results)
    write_json(args.json, results)
    return 0


def print_markdown(results: dict) -> None:
    """The memory and time table as benchmarks/README.md shows it."""
    gib = 1024**3
    print(
        "\n| stage | process | peak RSS GiB (anon + file-backed) | x bf16 weights | load s | s/step (tokens/s) | bytes written | seed states |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stage, r in results["stages"].items():
        model = results["model_bytes"]["llama-2-7b" if stage in ("finetune", "evaluate") else "olmoe-1b-7b"]
        speed = ""
        if "step_s" in r:
            speed = f"{r['step_s']:.1f} ({r['tokens_per_s']:.0f})"
        elif "tokens_per_s_incl_load" in r:
            speed = f"({r['tokens_per_s_incl_load']:.0f} incl. load)"
        written = r.get("trainable_bytes", r.get("bytes_outside_ray_train", 0))
        for role, p in sorted(r["processes"].items(), key=lambda item: -item[1]["peak_rss_gib"]):
            main = p["peak_rss_gib"] * gib > model / 4
            print(
                f"| {stage} | {role} | {p['peak_rss_gib']:.2f} ({p['peak_anon_gib']:.2f} + {p['peak_file_gib']:.2f}) "
                f"| {p['peak_rss_gib'] * gib / model:.2f} | {_fmt(r.get('load_s')) if main else ''} "
                f"| {speed if main else ''} | {f'{written / 1e6:,.1f} MB' if main else ''} "
                f"| {f'{SEED_STATED_GB[stage]} GB' if main and stage in SEED_STATED_GB else ''} |"
            )
    print(
        "model bytes (bf16): " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in results["model_bytes"].items())
    )


def _fmt(value) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else ""


def run_watched(argv: list[str]) -> dict:
    """Run ``argv``; sample every process of its tree; per process its peak VmHWM, RssAnon, RssFile."""
    env = {**os.environ, "SELECTMOE_VERBOSE": "0"}
    started = time.time()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, dict] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in process_tree(proc.pid):
                status = proc_status(pid)
                if status is None:
                    continue
                peak = peaks.setdefault(pid, {"names": set(), "VmHWM": 0, "RssAnon": 0, "RssFile": 0})
                peak["names"].add(status.pop("name"))
                for key, value in status.items():
                    peak[key] = max(peak[key], value)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    print(output.rstrip())
    processes: dict[str, dict] = {}
    for pid, peak in peaks.items():
        role = role_of(pid == proc.pid, peak["names"])
        gib = {k: peak[k] / 1024**2 for k in ("VmHWM", "RssAnon", "RssFile")}  # kB -> GiB
        if role not in processes or gib["VmHWM"] > processes[role]["peak_rss_gib"]:
            processes[role] = {
                "peak_rss_gib": gib["VmHWM"],
                "peak_anon_gib": gib["RssAnon"],
                "peak_file_gib": gib["RssFile"],
            }
    return {"rc": proc.returncode, "seconds": time.time() - started, "processes": processes}


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree += children.get(pid, [])
    return tree


def proc_status(pid: int) -> dict | None:
    """VmHWM, RssAnon, RssFile (kB) and the process title, or None once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        title = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    status = {k: int(values[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile") if k in values}
    return {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, **status, "name": title}


def role_of(is_root: bool, names: set[str]) -> str:
    if is_root:
        return "driver"
    for marker, role in ROLES:
        if any(marker in name for name in names):
            return role
    return "other Ray processes"


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(
        f.stat().st_size
        for f in folder.rglob("*")
        if f.is_file() and not any(part in skip for part in f.relative_to(folder).parts)
    )


def stage_numbers(stage: str, out: Path) -> dict:
    """What a stage's own outputs say: load and step seconds, tokens/s, the bytes it writes."""
    numbers: dict = {}
    if not (out / "manifest.json").is_file():
        return numbers
    manifest = json.loads((out / "manifest.json").read_text())
    numbers["stage_seconds"] = manifest.get("seconds")
    numbers["bytes_written"] = folder_bytes(out, skip=("logs",))
    numbers["bytes_outside_ray_train"] = folder_bytes(out, skip=("logs", "ray_train"))
    if stage.startswith(("pretrain", "finetune")):
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        numbers["load_s"] = steps[0].get("load_s")
        later = steps[1:] or steps  # the first step also pays for warm-up
        numbers["step_s"] = float(np.median([s["step_s"] for s in later]))
        numbers["tokens_per_s"] = float(np.median([s["tokens_per_s"] for s in later]))
        numbers["tokens_per_step"] = float(np.median([s["tokens"] for s in later]))
        weights = out / (manifest["outputs"].get("weights") or manifest["outputs"]["adapter"])
        numbers["trainable_bytes"] = folder_bytes(weights) if weights.is_dir() else weights.stat().st_size
    elif stage == "select":
        import pyarrow.parquet as pq

        scores = pq.read_table(out / "scores", columns=["n_tokens"])
        numbers["rows_scored"] = scores.num_rows
        numbers["rows_scored_before"] = manifest["counts"]["rows_scored_before"]  # 0: nothing resumed
        numbers["tokens_scored"] = int(np.sum(scores["n_tokens"].to_numpy()))
        numbers["scoring_s"] = manifest["metrics"]["timings"]["scoring_s"]
        if numbers["scoring_s"]:  # actor start and model load included
            numbers["tokens_per_s_incl_load"] = numbers["tokens_scored"] / numbers["scoring_s"]
    elif stage == "evaluate":
        results = json.loads((out / "results.json").read_text())
        numbers["load_s"] = results["config"].get("model_load_s")
        numbers["samples"] = manifest["counts"]["samples"]
    return numbers


def print_stage(stage: str, r: dict) -> None:
    print_table(
        f"{stage}: rc {r['rc']}, {r['seconds']:.0f} s",
        ["process", "peak RSS GiB", "anon GiB", "file-backed GiB"],
        [
            [role, p["peak_rss_gib"], p["peak_anon_gib"], p["peak_file_gib"]]
            for role, p in r["processes"].items()
        ],
    )
    shown = {k: v for k, v in r.items() if k not in ("processes", "rc", "seconds")}
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


# ---------------------------------------------------------------------------- run: stage-2 throughput


def throughput(args, olmoe: Path, rows: list[dict]) -> dict:
    """The seed loop and the product's scorer (original and default scoring) alternating, one model."""
    from selectmoe.config import ScoringSection
    from selectmoe.data.template import encode_batch, encode_replies_alone, ensure_pad_token, load_tokenizer
    from selectmoe.select.score import ScorePasses
    from selectmoe.select.scorer import GateScorer

    device = torch.device(args.device)
    tokenizer = ensure_pad_token(load_tokenizer(str(olmoe)))
    messages = [r["messages"] for r in rows[: args.throughput_rows]]
    encoded = encode_batch(messages, tokenizer, max_seq_length=args.max_length)
    kept = [i for i, e in enumerate(encoded) if isinstance(e, dict)]
    encoded = [encoded[i] for i in kept]
    replies = encode_replies_alone(
        [messages[i] for i in kept],
        tokenizer,
        max_seq_length=args.max_length,
        n_assistant_tokens=[e["n_assistant_tokens"] for e in encoded],
    )
    batch = {
        "id": _column([str(i) for i in kept]),
        "dataset": _column(["d"] * len(kept)),
        "input_ids": _column([e["input_ids"] for e in encoded]),
        "labels": _column([e["labels"] for e in encoded]),
        "reply_input_ids": _column([r["input_ids"] for r in replies]),
        "reply_labels": _column([r["labels"] for r in replies]),
    }
    started = time.perf_counter()
    scorer = GateScorer(  # the default's scoring, so that it keeps what its base-model passes need
        str(olmoe),
        scoring=ScoringSection(**DEFAULT_SCORING, tokens_per_batch=args.tokens_per_batch),
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
        cpu_threads=os.cpu_count() if device.type == "cpu" else None,
    )
    load_s = time.perf_counter() - started
    model = scorer.model
    original = ScoringSection()
    default = ScoringSection(**DEFAULT_SCORING)

    def product(scoring, max_rows: int):
        def score():
            scorer.scoring, scorer.passes = scoring, ScorePasses.for_scoring(scoring)
            scorer.max_rows = max_rows
            scorer(batch)

        return score

    max_rows_values = args.max_rows or [scorer.max_rows]
    loops = {"seed loop": lambda: seed_loop(model, encoded, tokenizer.pad_token_id, device)}
    for max_rows in max_rows_values:
        suffix = "" if len(max_rows_values) == 1 else f", {max_rows} rows"
        loops[f"original preset{suffix}"] = product(original, max_rows)
        loops[f"default preset{suffix}"] = product(default, max_rows)
    # warm-up: every batch shape once (oneDNN builds its kernels per shape, a cost a long run amortises)
    seed_loop(model, encoded[:4], tokenizer.pad_token_id, device)
    for max_rows in max_rows_values:
        product(default, max_rows)()
    seconds = {}
    for name, fn in loops.items():  # alternating: each loop once, in turn, over the same rows
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds[name] = time.perf_counter() - start
    peak = matmul_peak(device, torch.bfloat16, 8192 if device.type == "cuda" else 2048, 10.0)
    experts = experts_layer_seconds(
        model, device, tokens=int(np.median([len(e["input_ids"]) for e in encoded])) * 16
    )
    config = model.config
    lengths = [len(e["input_ids"]) for e in encoded]
    scored = [int(np.sum(np.asarray(e["labels"]) != -100)) for e in encoded]
    reply_lengths = [len(r["input_ids"]) for r in replies]
    reply_scored = [int(np.sum(np.asarray(r["labels"]) != -100)) for r in replies]
    head = 2 * config.hidden_size * config.vocab_size
    gates_flops = sum(decoder_flops_per_row(config, n, lm_head=False) for n in lengths)
    default_flops = (
        gates_flops * (2 if default.nll_model == "base" else 1)  # the gates' pass, and the base's
        + head * sum(scored)
        + sum(decoder_flops_per_row(config, n, lm_head=False) for n in reply_lengths)
        + head * sum(reply_scored)
    )
    # a gate score (the seed loop, the original preset) needs the decoder only
    useful = {name: default_flops if name.startswith("default") else gates_flops for name in loops}
    tokens = sum(lengths)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "tokens_per_batch": scorer.max_tokens,
        "max_rows": max_rows_values,
        "rows": len(encoded),
        "real_tokens": tokens,
        "seed_padding_efficiency": tokens
        / sum(
            len(lengths[i : i + SEED_BATCH]) * max(lengths[i : i + SEED_BATCH])
            for i in range(0, len(lengths), SEED_BATCH)
        ),
        "load_s": load_s,
        "seconds": seconds,
        "tokens_per_s": {name: tokens / s for name, s in seconds.items()},
        "speedup_vs_seed": {name: seconds["seed loop"] / s for name, s in seconds.items()},
        "bf16_matmul_peak_flops": peak,
        "useful_flops": useful,
        "share_of_peak": {name: useful[name] / seconds[name] / peak for name in seconds},
        "experts_implementation": model.config._experts_implementation,
        "one_moe_block_seconds": experts,
    }


def experts_layer_seconds(model, device: torch.device, tokens: int) -> dict[str, float]:
    """Best of 3: one MoE block (router, gate, experts) of the loaded model on ``tokens`` random hidden
    states, with each experts implementation transformers offers (the loops above run the default)."""
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, tokens, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    default = model.config._experts_implementation
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(implementation)
            with torch.inference_mode():
                block(hidden)
                runs = [timed(lambda: block(hidden), sync) for _ in range(3)]
            seconds[implementation] = min(runs)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            seconds[implementation] = f"failed: {err}"[:200]
    model.set_experts_implementation(default)
    return seconds


def seed_loop(model, encoded: list[dict], pad_token_id: int, device: torch.device) -> None:
    """The seed's scoring: corpus order, batches of 32 padded to the longest, the full model with its
    LM head and ``output_router_logits``, a mean gate per row and layer."""
    from selectmoe.data.collate import collate

    for start in range(0, len(encoded), SEED_BATCH):
        batch = collate(encoded[start : start + SEED_BATCH], pad_token_id, device)
        mask = batch["attention_mask"]
        with torch.inference_mode():
            out = model(input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True)
            gates = torch.stack([torch.sigmoid(r["quality_score"][..., 0]) for r in out.router_logits], -1)
            (gates * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def _column(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def print_throughput(t: dict) -> None:
    print_table(
        f"stage-2 throughput on {t['device']} ({t['torch_threads']} threads, scorer batches of {t['tokens_per_batch']} tokens "
        f"and at most {t['max_rows']} rows), {t['rows']} rows, "
        f"{t['real_tokens']} real tokens; bf16 matmul peak {t['bf16_matmul_peak_flops'] / 1e9:.0f} GFLOP/s",
        ["loop", "seconds", "real tokens/s", "x seed loop", "useful FLOP/s share of peak"],
        [
            [
                name,
                t["seconds"][name],
                t["tokens_per_s"][name],
                t["speedup_vs_seed"][name],
                t["share_of_peak"][name],
            ]
            for name in t["seconds"]
        ],
    )
    blocks = ", ".join(
        f"{k} {v * 1000:.0f} ms" if isinstance(v, float) else f"{k} {v}"
        for k, v in t["one_moe_block_seconds"].items()
    )
    print(f"one MoE block (the loops ran {t['experts_implementation']}): {blocks}")


if __name__ == "__main__":
    sys.exit(main())

"""Stage-1 step cost (issue 4): a Select-MoE router-training step vs a plain OLMoE step, and Ray Train
tokens/s with 1 vs 2 workers.

    .venv/bin/python benchmarks/stage1_step_cost.py                       # full run (~5 min on 2 cores)
    .venv/bin/python benchmarks/stage1_step_cost.py --json stage1.json    # also write the numbers
    .venv/bin/python benchmarks/stage1_step_cost.py --skip-ray --model-overrides hidden_size=256 \
        intermediate_size=512 num_hidden_layers=4 num_experts=16 num_experts_per_tok=4   # part 1, wider
    .venv/bin/python benchmarks/stage1_step_cost.py --rows 4 --reps 2 --warmup 1 --max-length 128 \
        --ray-steps 2 --ray-batch 4 --ray-max-length 64 --ray-files oasst1.jsonl --ray-subset-ratio 0.1  # CI

Part 1, one process, no Ray: the same tiny OLMoE weights loaded as Select-MoE (``load_select_moe`` +
``setup_trainable(full_rank)``: quality gates + MoE routers train) and as transformers' OLMoE (MoE routers
train: the same parameters minus the gates, which OLMoE has not). One batch of real tokenised rows. All
variants run the same experts implementation (``--experts``; default eager, what Select-MoE loads with,
while transformers' OLMoE would pick grouped_mm). A step = forward + backward + gradient clipping + AdamW
step. Three variants are timed, interleaved in a rotating order, and their medians compared:
  select-moe step  the product's stage-1 step (``selectmoe.pretrain.worker._train_step``: the model
                   with router outputs + quality loss, and the per-layer gate statistics it logs)
  select-moe model the Select-MoE forward/backward alone (``out.loss.backward()``, no statistics)
  olmoe            OLMoE's forward/backward (``out.loss.backward()``)
Goal: select-moe step <= 1.10x olmoe.

Part 2: ``pretrain`` run twice, ``scaling.num_workers=1`` and ``2``, same global batch (the 2-worker
run splits it), same rows, 1 CPU of training resources in both; tokens/s from each run's ``metrics.jsonl``
(median over the steps after the first) and the wall time of the whole call.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
from common import (
    TRAIN_DIR,
    encode_rows,
    median,
    print_table,
    quiet_ray,
    quiet_transformers,
    sample_rows,
    set_experts,
    timed,
    write_json,
)

GOAL = 1.10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=TRAIN_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=8, help="rows in the one batch of part 1")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--model-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="tiny OLMoE config fields for part 1, e.g. hidden_size=256 (values parsed as JSON)",
    )
    p.add_argument("--reps", type=int, default=15, help="timed steps per variant in part 1")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--experts",
        default="eager",
        choices=["eager", "grouped_mm", "batched_mm"],
        help="experts implementation of all variants (eager: what Select-MoE loads with)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="in part 1, for all variants")
    p.add_argument("--ray-steps", type=int, default=12, help="optimiser steps per Ray Train run")
    p.add_argument("--ray-batch", type=int, default=8, help="global batch (rows per step) of both runs")
    p.add_argument("--ray-max-length", type=int, default=256)
    p.add_argument("--ray-files", nargs="+", default=["*.jsonl"], help="file names or globs in --data-dir")
    p.add_argument("--ray-subset-ratio", type=float, default=0.01, help="dataset.subset_ratio of the runs")
    p.add_argument("--skip-ray", action="store_true", help="part 1 only")
    p.add_argument("--json", help="write the measured numbers here")
    return p.parse_args()


# ---------------------------------------------------------------------------- part 1: one step, A vs B


def build_variants(model_dir: Path, batch: dict, step_tokens: int, experts: str):
    """{name: (model, trainable params, step function)}; each owns its model and AdamW optimiser."""
    from transformers import OlmoeForCausalLM

    from selectmoe.models.loading import load_select_moe
    from selectmoe.pretrain.worker import _train_step, setup_trainable

    select = setup_trainable(load_select_moe(str(model_dir), dtype="float32", seed=0), "full_rank", {})
    select_bare = setup_trainable(load_select_moe(str(model_dir), dtype="float32", seed=0), "full_rank", {})
    olmoe = OlmoeForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name, param in olmoe.named_parameters():
        param.requires_grad = name.endswith("mlp.gate.weight")
    for model in (select, select_bare, olmoe):
        set_experts(model, experts)
    product_step = functools.partial(_train_step, coef=select.config.router_aux_loss_coef)

    def select_step(model):
        product_step(model, [batch], step_tokens, 1)

    def select_model_step(model):
        model(**batch, output_router_logits=True, num_items_in_batch=step_tokens).loss.backward()

    def olmoe_step(model):
        model(**batch, num_items_in_batch=step_tokens).loss.backward()

    variants = {
        "select-moe step": (select, select_step),
        "select-moe model": (select_bare, select_model_step),
        "olmoe": (olmoe, olmoe_step),
    }
    return {name: _optimised(model, fn) for name, (model, fn) in variants.items()}


def _optimised(model, backward_fn):
    """forward/backward + clip + AdamW step + zero_grad, as the stage-1 loop does."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)

    def step():
        backward_fn(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, params, step


def step_cost(args, model_dir: Path, tokenizer) -> dict:
    from selectmoe.data.collate import collate, count_labelled
    from selectmoe.data.template import ensure_pad_token

    encoded = encode_rows(sample_rows(args.data_dir, args.rows, args.seed), tokenizer, args.max_length)
    batch = collate(encoded, ensure_pad_token(tokenizer).pad_token_id, torch.device("cpu"))
    step_tokens = sum(count_labelled(e["labels"]) for e in encoded)
    variants = build_variants(model_dir, batch, step_tokens, args.experts)
    if args.gradient_checkpointing:
        for model, _, _ in variants.values():
            model.gradient_checkpointing_enable()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no variant always first
        for name in order:
            seconds = timed(variants[name][2])
            if rep >= args.warmup:
                times[name].append(seconds)
    trainable = {name: sum(p.numel() for p in params) for name, (_, params, _) in variants.items()}
    result = {
        "batch_shape": list(batch["input_ids"].shape),
        "real_tokens": int(batch["attention_mask"].sum()),
        "torch_threads": torch.get_num_threads(),
        "experts": args.experts,
        "model_overrides": args.model_overrides,
        "gradient_checkpointing": args.gradient_checkpointing,
        "median_s": {name: median(t) for name, t in times.items()},
        "all_s": times,
        "trainable_params": trainable,
    }
    base = result["median_s"]["olmoe"]
    result["ratio_vs_olmoe"] = {name: s / base for name, s in result["median_s"].items()}
    return result


# ---------------------------------------------------------------------------- part 2: Ray Train workers


def ray_scaling(args, model_dir: Path, work: Path) -> dict:
    from selectmoe.config import parse_config
    from selectmoe.pretrain import pretrain

    files = ",".join(str(p) for pattern in args.ray_files for p in sorted(args.data_dir.glob(pattern)))
    runs = {}
    for workers in (1, 2):  # 1 CPU for training in both runs, 1 left for Ray Data (the product's rule)
        overrides = {
            "selector_model.path": model_dir,
            "output_dir": work / f"ray_workers_{workers}",
            "seed": args.seed,
            "dataset.data_path": f"[{files}]",
            "dataset.subset_ratio": args.ray_subset_ratio,
            "dataset.max_sequence_length": args.ray_max_length,
            "training.batch_size": args.ray_batch,
            "training.per_device_batch_size": 1,
            "training.epochs": 1,
            "training.max_steps": args.ray_steps,
            "training.gradient_checkpointing": False,
            "scaling.num_workers": workers,
            "scaling.resources_per_worker": f"{{CPU: {1 / workers}}}",
        }
        cfg = parse_config("pretrain", overrides=[f"{k}={v}" for k, v in overrides.items()])
        start = time.perf_counter()
        out = pretrain(cfg)
        wall = time.perf_counter() - start
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        steady = history[1:] or history  # the first step pays for warm-up
        runs[workers] = {
            "steps": len(history),
            "tokens_per_s_median": median([m["tokens_per_s"] for m in steady]),
            "tokens_per_step_mean": sum(m["tokens"] for m in steady) / len(steady),
            "wall_s": wall,
        }
    return {
        "runs": runs,
        "tokens_per_s_ratio_2_vs_1": runs[2]["tokens_per_s_median"] / runs[1]["tokens_per_s_median"],
        "wall_ratio_2_vs_1": runs[2]["wall_s"] / runs[1]["wall_s"],
    }


# ---------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    quiet_transformers()
    from selectmoe.data.template import load_tokenizer
    from selectmoe.demo.tiny import build_tiny_olmoe

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.model_overrides)}
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as tmp:
        model_dir = build_tiny_olmoe(Path(tmp) / "tiny_olmoe", seed=args.seed)
        part1_dir = (
            build_tiny_olmoe(Path(tmp) / "part1", seed=args.seed, **overrides) if overrides else model_dir
        )
        report = {"step_cost": step_cost(args, part1_dir, load_tokenizer(str(model_dir)))}
        report_step_cost(args, report["step_cost"])
        if not args.skip_ray:
            import ray

            quiet_ray()
            report["ray_train"] = ray_scaling(args, model_dir, Path(tmp))
            ray.shutdown()
            report_ray(args, report["ray_train"])
    write_json(args.json, report)


def report_step_cost(args, cost: dict) -> None:
    model = f"tiny OLMoE {' '.join(args.model_overrides)}".strip()
    print_table(
        f"Part 1: stage-1 step, {model}, batch {cost['batch_shape']} ({cost['real_tokens']} real tokens), "
        f"{args.reps} interleaved reps, experts {args.experts}, torch threads {cost['torch_threads']}",
        ["variant", "trainable params", "median s", "min s", "max s", "ratio vs olmoe"],
        [
            [name, cost["trainable_params"][name], s, min(t), max(t), cost["ratio_vs_olmoe"][name]]
            for name, s in cost["median_s"].items()
            for t in [cost["all_s"][name]]
        ],
    )
    ratio = cost["ratio_vs_olmoe"]["select-moe step"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"ratio select-moe step / olmoe step: {ratio:.3f}x (goal <= {GOAL:.2f}x: {verdict})")
    print(f"ratio select-moe model / olmoe step: {cost['ratio_vs_olmoe']['select-moe model']:.3f}x")


def report_ray(args, scaling: dict) -> None:
    print_table(
        f"Part 2: pretrain, global batch {args.ray_batch}, {args.ray_steps} steps, "
        f"max length {args.ray_max_length}",
        ["workers", "steps", "tokens/step", "median tokens/s", "wall s (whole call)"],
        [
            [w, r["steps"], r["tokens_per_step_mean"], r["tokens_per_s_median"], r["wall_s"]]
            for w, r in scaling["runs"].items()
        ],
    )
    print(f"ratio tokens/s 2 workers / 1 worker: {scaling['tokens_per_s_ratio_2_vs_1']:.2f}x")
    print(f"ratio wall time 2 workers / 1 worker: {scaling['wall_ratio_2_vs_1']:.2f}x")
    print(
        "note: 1 CPU is left to Ray Data, so 1 worker gets 1 logical CPU and 2 workers 0.5 each; "
        "Ray starts every worker with OMP_NUM_THREADS from its share, i.e. 1 torch thread, so 1 worker "
        "uses one core and 2 workers use both cores of this 2-core machine: a gain here is the "
        "second core, not evidence of multi-node scaling (each step also pays a gradient all-reduce)"
    )


if __name__ == "__main__":
    main()

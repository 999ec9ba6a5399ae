"""The LESS protocol end to end (Xia et al. 2024, arXiv 2402.04333), ready for a GPU cluster.

An OLMoE-1B-7B selector picks 5% of the LESS pool (flan_v2, cot, dolly, oasst1); Llama-2-7B is
LoRA-finetuned on each selection with LESS's settings (r=128, alpha 512, dropout 0.1 on q/k/v/o;
lr 2e-5, 4 epochs, batch 128: ``selectmoe/configs/finetune.yaml``) and evaluated on MMLU 5-shot,
BBH 3-shot CoT and TyDi QA 1-shot (``evaluate.eval.tasks=[less]``). Methods:

- ``default``: the default preset (``filtered_random``);
- ``similarity``: ``preset=less_targets``, similarity to the evaluations' own shots (RDS+);
- ``calibrated``: ``preset=calibrated`` with those shots as the trusted rows (a logistic regression on
  the stored per-row features that tells them from the pool);
- ``random_S``: a seeded random 5% for each ``--random-seeds`` S (the same score files, no rescoring).

Every method runs the product's stages with the product's configs (``selectmoe.pipeline.stage_configs``
of ``selectmoe pipeline preset=...``) and shares one stage 1. Each stage is skipped when its folder
already holds a finished run under the same key, so a rerun after a failure continues where it stopped.

On a cluster (``--train-dir``: the LESS pool in open-instruct JSONL; ``--eval-dir``: the evaluation
sets in ``eval.data_dir``'s layout)::

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env cluster_configs/runtime_env.yaml -- python benchmarks/less_protocol.py \\
        --train-dir /data/less/train --eval-dir /data/eval --work-dir /shared/less_protocol \\
        --json /shared/less_protocol/less_protocol.json --set finetune.scaling.num_workers=8

``--tiny`` runs the same code at a tiny shape on CPU (tiny offline models, a few hundred rows, two
items per evaluation task); CI runs it. ``--set KEY=VALUE`` (repeatable) goes to every method's pipeline
config (``--set finetune.scaling.num_workers=8``, ``--set select.scoring.tokens_per_batch=16384``, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import EVAL_DIR, TRAIN_DIR, quiet_ray, quiet_transformers, sample_rows, write_json

from selectmoe.config import PipelineConfig, parse_config, to_dict
from selectmoe.evaluate import evaluate
from selectmoe.evaluate.results import metric_rows
from selectmoe.evaluate.tasks import less_shot_rows
from selectmoe.finetune import finetune
from selectmoe.layout import RESULTS, SELECTED_JSONL
from selectmoe.pipeline import run_stage, share_scores, stage_configs
from selectmoe.pretrain import pretrain
from selectmoe.select import select

STAGES = {"pretrain", "select", "finetune", "evaluate"}
# the headline metric of each LESS benchmark (hub group, or its offline version)
HEADLINE = {
    "mmlu": "acc",
    "mmlu_local": "acc",
    "bbh_cot_fewshot": "exact_match (get-answer)",
    "bbh_local": "exact_match (get-answer)",
    "tydiqa_goldp": "f1",
    "tydiqa_local": "f1",
}
# --tiny: small stages; one task of each benchmark, two items each
TINY_OVERRIDES = [
    "pretrain.training.max_steps=4",
    "pretrain.dataset.subset_ratio=0.3",
    "select.dataset.max_sequence_length=256",
    "select.selection_percentage=0.2",
    "finetune.training.max_steps=2",
    "finetune.training.batch_size=2",
    "finetune.training.per_device_batch_size=2",
    "finetune.training.lora.r=8",
    "finetune.training.lora.lora_alpha=16",
    "finetune.dataset.max_sequence_length=256",
    "evaluate.eval.tasks=[mmlu_local_anatomy,bbh_local_boolean_expressions,tydiqa_local_english]",
    "evaluate.eval.limit=2",
    "evaluate.eval.max_gen_toks=4",
]


def main() -> int:
    args = parse_args()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if args.tiny:  # a quiet local Ray (on a cluster the stages join the job's)
        quiet_transformers()
        quiet_ray(dashboard=True)
        args.train_dir, args.selector, args.target = tiny_setup(work, Path(args.train_dir), args.tiny_rows)
        overrides = [*TINY_OVERRIDES, *overrides]
    started = time.time()
    results = run_protocol(args, work, overrides)
    summary = summarise(results, args.random_seeds)
    print_summary(summary)
    write_json(
        args.json,
        {"args": vars(args), "overrides": overrides, "runs": results, "summary": summary,
         "seconds": round(time.time() - started, 1)},
    )  # fmt: skip
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="outputs/less_protocol")
    p.add_argument("--train-dir", default=str(TRAIN_DIR), help="the pool: open-instruct JSONL files")
    p.add_argument("--eval-dir", default=str(EVAL_DIR), help="evaluation sets in eval.data_dir's layout")
    p.add_argument("--selector", default="allenai/OLMoE-1B-7B-0125")
    p.add_argument("--target", default="meta-llama/Llama-2-7b-hf")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["default", "similarity", "calibrated"],
        choices=["default", "similarity", "calibrated"],
    )
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tiny", action="store_true", help="tiny offline models and a few hundred rows (CI)")
    p.add_argument("--tiny-rows", type=int, default=240)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key for every method's pipeline config (repeat it)",
    )
    return p.parse_args()


def tiny_setup(work: Path, train_dir: Path, rows: int) -> tuple[str, str, str]:
    """(pool, selector, target): a sample of ``train_dir`` and tiny offline models, built once."""
    from selectmoe.demo.tiny import build_tiny_llama, build_tiny_olmoe

    selector, target, pool = work / "tiny_olmoe", work / "tiny_llama", work / "pool"
    if not (selector / "config.json").exists():
        build_tiny_olmoe(selector, seed=0)
    if not (target / "config.json").exists():
        build_tiny_llama(target, seed=0)
    pool.mkdir(exist_ok=True)
    sample = sample_rows(train_dir, rows, seed=0)
    (pool / "pool.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample))
    return str(pool), str(selector), str(target)


# ---------------------------------------------------------------------------- the runs


def method_config(args, preset: str, overrides: list[str], work: Path) -> PipelineConfig:
    keys = [
        f"preset={preset}",
        f"dataset.data_path={args.train_dir}",
        f"pretrain.selector_model.path={args.selector}",
        f"finetune.model.name={args.target}",
        f"evaluate.eval.data_dir={args.eval_dir}",
    ]
    if preset == "less_targets":
        keys.append(f"select.selection.target_eval_dir={args.eval_dir}")
    if preset == "calibrated":  # the evaluations' shots are the trusted rows
        shots = work / "eval_shots.jsonl"
        shots.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in less_shot_rows(args.eval_dir))
        )
        keys.append(f"select.selection.trusted=[{shots}]")
    return parse_config("pipeline", overrides=[*keys, *overrides])


def run_protocol(args, work: Path, overrides: list[str]) -> dict[str, dict]:
    """{method: {"selected_rows", "metrics": {benchmark: value}}}: one shared stage 1, then per method
    its own stage 2 (random draws reuse the default's score files), 3 and 4."""
    default_cfg = method_config(args, PipelineConfig().preset, overrides, work)
    configs = {"default": default_cfg}
    for method, preset in (("similarity", "less_targets"), ("calibrated", "calibrated")):
        if method in args.methods:
            configs[method] = method_config(args, preset, overrides, work)
    pre = stage_configs(default_cfg, work)[0]
    for name, cfg in configs.items():
        if to_dict(stage_configs(cfg, work)[0]) != to_dict(pre):
            raise SystemExit(f"{name}: its stage 1 differs from the default's; the protocol shares one")
    pre_key = run_stage("pretrain", pre, pretrain, [], STAGES)

    # the default's stage 2 always runs: the random draws reuse its score files
    _, default_sel, *_ = stage_configs(default_cfg, work / "default")
    wanted = ["default"] if "default" in args.methods else []
    wanted += [f"random_{s}" for s in args.random_seeds]
    wanted += [m for m in ("similarity", "calibrated") if m in args.methods]
    results = {}
    for method in ["default", *[m for m in wanted if m != "default"]]:
        cfg = configs.get(method, default_cfg)
        _, sel, fin, ev = stage_configs(cfg, work / method)
        sel.model_checkpoint_path = pre.output_dir
        if method.startswith("random_"):
            sel.selection.method, sel.seed = "random", int(method.removeprefix("random_"))
            share_scores(Path(default_sel.output_dir), Path(sel.output_dir))
        sel_key = run_stage("select", sel, select, [pre_key], STAGES)
        if method not in wanted:
            continue
        fin_key = run_stage("finetune", fin, finetune, [sel_key], STAGES)
        run_stage("evaluate", ev, evaluate, [fin_key], STAGES)
        results[method] = {
            "selected_rows": sum(1 for _ in (Path(sel.output_dir) / SELECTED_JSONL).open()),
            "metrics": headline_metrics(Path(ev.output_dir) / RESULTS),
            "run": str(work / method),
        }
    return results


def headline_metrics(results_file: Path) -> dict[str, float]:
    """{benchmark: its headline metric}; with single tasks (``--tiny``), every task's first metric."""
    rows = metric_rows(json.loads(results_file.read_text()))
    groups = {r.task: r.value for r in rows if HEADLINE.get(r.task) == r.metric}
    if groups:
        return groups
    firsts: dict[str, float] = {}
    for r in rows:
        firsts.setdefault(r.task, r.value)
    return firsts


# ---------------------------------------------------------------------------- report


def summarise(results: dict[str, dict], random_seeds: list[int]) -> dict:
    draws = [results[f"random_{s}"]["metrics"] for s in random_seeds if f"random_{s}" in results]
    benchmarks = sorted({b for r in results.values() for b in r["metrics"]})
    random = {
        b: {
            "mean": statistics.mean(d[b] for d in draws),
            "std": statistics.stdev(d[b] for d in draws) if len(draws) > 1 else 0.0,
        }
        for b in benchmarks
    } if draws else {}  # fmt: skip
    methods = {}
    for method, r in results.items():
        if method.startswith("random_"):
            continue
        m = r["metrics"]
        methods[method] = {
            "metrics": m,
            "average": statistics.mean(m.values()),
            "margin_vs_random": {b: m[b] - random[b]["mean"] for b in benchmarks} if random else {},
        }
    return {"benchmarks": benchmarks, "random": random, "methods": methods, "random_draws": len(draws)}


def print_summary(summary: dict) -> None:
    benchmarks = summary["benchmarks"]
    print(f"\n| method | {' | '.join(benchmarks)} | average |")
    print("|---|" + "---:|" * (len(benchmarks) + 1))
    if summary["random"]:
        cells = [
            f"{summary['random'][b]['mean']:.4f} ± {summary['random'][b]['std']:.4f}" for b in benchmarks
        ]
        mean = statistics.mean(summary["random"][b]["mean"] for b in benchmarks)
        print(f"| random ({summary['random_draws']} draws) | {' | '.join(cells)} | {mean:.4f} |")
    for method, v in summary["methods"].items():
        cells = [
            f"{v['metrics'][b]:.4f}"
            + (f" ({v['margin_vs_random'][b]:+.4f})" if v["margin_vs_random"] else "")
            for b in benchmarks
        ]
        print(f"| {method} | {' | '.join(cells)} | {v['average']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())

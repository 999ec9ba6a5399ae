"""The stage-1 recipe search through the product's own Tune sweep, on real rows with planted defects.

The corpus, labels and base model of ``selection_quality.py`` (same seed, same cache): ``run_sweep``
samples ``--space`` (quality-loss type x weight x learning rate x training length x trash mode by
default), ASHA prunes on ``probe_auroc`` (the gate score's AUROC, clean rows positive, on up to
``--probe-rows`` labelled rows stage 1 does not train on), nothing is handed on to stages 2-4. Printed:
every trial best first, and on the same probe rows the AUROC of perplexity under the base model, so the
best recipe stands next to the baseline it has to beat. Then confirm a recipe on the full benchmark:

    .venv/bin/python benchmarks/sweep_search.py --num-samples 12                 # ~30 min on 2 cores
    .venv/bin/python benchmarks/selection_quality.py --seeds 0 1 2 --variants \\
        --variant best:training.quality_loss_type=mse,training.learning_rate=0.01,...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import TRAIN_DIR, print_table, quiet_ray, quiet_transformers, write_json
from selection_quality import base_model, sample_by_file, write_corpus

from selectmoe.config import parse_config
from selectmoe.layout import TRIALS_DIR, TRIALS_FILE
from selectmoe.metrics import auroc
from selectmoe.sweep import run_sweep


def main() -> None:
    args = parse_args()
    quiet_transformers()
    quiet_ray(dashboard=True)
    started = time.time()
    work = Path(args.work_dir) / f"seed{args.seed}"
    rows = sample_by_file(Path(args.data_dir), 2 * args.rows, args.seed)
    lm_rows, corpus_rows = rows[::2], rows[1::2]
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    write_corpus(corpus_rows, corpus, args.defect_rate, args.seed)
    model = base_model(args, args.seed, lm_rows, Path(args.models_dir))
    out = work / "sweep"
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    cfg = parse_config("sweep", overrides=sweep_overrides(args, corpus, model, out))
    run_sweep(cfg)
    trials = json.loads((out / TRIALS_FILE).read_text())
    baseline = perplexity_on_probe_rows(cfg, out / TRIALS_DIR / trials[0]["folder"], model)
    rows_out = [
        [t["folder"], *(t["overrides"].get(k, "") for k in KEYS), t["steps"], t["metric"]] for t in trials
    ]
    rows_out.append(["perplexity (-NLL, base model)", *([""] * len(KEYS)), "", baseline])
    print_table(
        f"Sweep trials, best first (probe_auroc on held-out probe rows, clean = positive; seed {args.seed})",
        ["trial", *(k.removeprefix("training.") for k in KEYS), "steps", "probe_auroc"],
        rows_out,
    )
    best = trials[0]["overrides"]
    print("\nconfirm the best recipe on the full benchmark:")
    print("  --variant best:" + ",".join(f"{k}={v}" for k, v in sorted(best.items())))
    print(f"\ntotal {time.time() - started:.0f} s")
    write_json(args.json, {"args": vars(args), "trials": trials, "perplexity_probe_auroc": baseline})


KEYS = [
    "training.quality_loss_type",
    "training.quality_loss_weight",
    "training.learning_rate",
    "training.max_steps",
    "training.trash_expert_mode",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(TRAIN_DIR))
    p.add_argument("--work-dir", default="/tmp/selectmoe_sweep_search")
    p.add_argument("--models-dir", default="/tmp/selectmoe_selection_quality/models", help="base-model cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=1500, help="corpus rows (as many again LM-pretrain the model)")
    p.add_argument("--defect-rate", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lm-steps", type=int, default=300, help="LM pretraining steps of the tiny OLMoE")
    p.add_argument("--model", nargs="*", default=[], help="tiny OLMoE config overrides, e.g. hidden_size=128")
    p.add_argument("--space", default="tune_spaces/selection_search.yaml")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-steps", type=int, default=80, help="the base stage-1 length (>= any searched)")
    p.add_argument("--grace-period", type=int, default=10)
    p.add_argument("--probe-rows", type=int, default=512)
    p.add_argument("--subset-ratio", type=float, default=0.4)
    p.add_argument("--resume", action="store_true", help="continue the sweep in --work-dir")
    p.add_argument("--json", default=None)
    return p.parse_args()


def sweep_overrides(args, corpus: Path, model: Path, out: Path) -> list[str]:
    """The benchmark's stage 1 (as in selection_quality.py) with the sweep's keys; no hand-off."""
    return [
        f"seed={args.seed}",
        f"output_dir={out}",
        f"pretrain.dataset.data_path=[{corpus / 'train'}]",
        f"pretrain.dataset.max_sequence_length={args.max_length}",
        f"pretrain.dataset.subset_ratio={args.subset_ratio}",
        f"pretrain.selector_model.path={model}",
        f"pretrain.training.max_steps={args.max_steps}",
        "pretrain.training.batch_size=16",
        "pretrain.training.per_device_batch_size=8",
        "pretrain.training.gradient_checkpointing=false",
        "pretrain.training.checkpoint_every_steps=0",
        f"pretrain.training.probe_rows={args.probe_rows}",
        f"pretrain.training.probe_every_steps={args.grace_period}",
        "pretrain.scaling.num_workers=1",
        f"sweep.space={args.space}",
        f"sweep.num_samples={args.num_samples}",
        f"sweep.grace_period={args.grace_period}",
        "sweep.handoff_top_k=0",
        f"sweep.probe_labels={corpus / 'labels.jsonl'}",
    ]


@torch.inference_mode()
def perplexity_on_probe_rows(cfg, trial: Path, model_dir: Path) -> float:
    """AUROC of -NLL under the base LM on the probe rows the trials were judged on (the same choice:
    every trial trains on the same subset, so ``probe_rows`` picks the same rows)."""
    from transformers import AutoModelForCausalLM

    from selectmoe.data import ensure_pad_token, load_tokenizer
    from selectmoe.pipeline import stage_configs
    from selectmoe.pretrain.driver import probe_rows
    from selectmoe.ray_data import read_rows
    from selectmoe.select.score import ScorePasses, score_batch

    pretrain_cfg = stage_configs(cfg, trial)[0]
    pretrain_cfg.training.probe_labels = cfg.sweep.probe_labels  # as run_sweep gives it to every trial
    read = read_rows(
        pretrain_cfg.dataset, pretrain_cfg.data, seed=pretrain_cfg.seed, tokenizer_name=str(model_dir)
    )
    rows = probe_rows(pretrain_cfg, str(model_dir), read)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pad = ensure_pad_token(load_tokenizer(str(model_dir))).pad_token_id
    nll = []
    for start in range(0, len(rows), 32):
        columns = score_batch(model, rows[start : start + 32], ScorePasses(gates=False, nll=True), pad)
        nll += columns["nll"].tolist()
    return auroc(-np.asarray(nll), np.asarray([r["clean"] for r in rows]))


if __name__ == "__main__":
    sys.exit(main())

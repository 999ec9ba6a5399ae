"""``selectmoe demo`` (what ``make demo`` runs): the whole pipeline on its embedded default.

Local Ray, the generated demo corpus (with planted low-quality rows of named kinds), tiny models built
offline and briefly pretrained as LMs on separately generated clean text (cached), all four stages and
a random baseline, then ``report.md``, which also measures how well the scores separate the planted
rows from clean ones next to baselines computed in the same run (random, perplexity under the model
the NLL terms use, response length). The last line printed is the path of ``report.md``.

    selectmoe demo                          # outputs/demo/report.md, ~5 minutes on 2 CPU cores
    selectmoe demo demo.rows=4000 pretrain.training.quality_loss_type=mse
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from selectmoe.config import DemoConfig, ScoringSection, load_preset
from selectmoe.console import phase
from selectmoe.demo.corpus import LABELS_FILE, write_demo_corpus
from selectmoe.layout import (
    BASELINE_PREFIX,
    CALIBRATION,
    COMMON_NGRAMS,
    MANIFEST,
    SCORES_DIR,
    SELECTED_JSONL,
    SEPARATION,
    STAGE_DIRS,
    TRAINING_IDS,
)
from selectmoe.manifest import hash_dict, read_manifest
from selectmoe.metrics import paired_auroc_difference, separation_table
from selectmoe.pipeline import run_pipeline
from selectmoe.reporting.report import markdown_table
from selectmoe.select.calibrate import combiner_columns, combiner_score
from selectmoe.select.score import row_score, score_columns, score_of

MODELS_VERSION = 4  # bump when the tiny demo models change (4: a tokenizer trained on the LM rows)
# peak LM-pretraining learning rates (linear decay to 0): the selector's from benchmarks/lm_plateau.py --lr
LM_LEARNING_RATES = {"selector_olmoe": 1e-2, "target_llama": 3e-3}
REFERENCE_ROWS = 300
LM_ROWS, TOKENIZER_VOCAB = 2000, 2048  # the demo models' LM-pretraining rows and their tokenizer's size


def run_demo(cfg: DemoConfig) -> Path:
    run = Path(cfg.output_dir).resolve()
    data = run / "data"
    if not (data / LABELS_FILE).exists():
        with phase(f"demo: generating {cfg.demo.rows} rows with planted defects"):
            write_demo_corpus(data, seed=cfg.seed, n_rows=cfg.demo.rows, defect_rate=cfg.demo.defect_rate)
    selector, target = demo_models(cfg)
    requires = load_preset(cfg.preset)["requires"]
    if "pretrain.training.reference_data" in requires:
        cfg.pretrain.training.reference_data = cfg.pretrain.training.reference_data or [
            str(demo_reference(data / "reference", cfg.seed))
        ]
    if "select.selection.trusted" in requires:
        cfg.select.selection.trusted = cfg.select.selection.trusted or [
            str(demo_reference(data / "reference", cfg.seed))
        ]
    cfg.dataset.data_path = [str(data / "train")]
    cfg.pretrain.selector_model.path = str(selector)
    cfg.finetune.model.name = str(target)
    cfg.evaluate.eval.data_dir = str(data / "eval")
    report = run_pipeline(cfg, extra_sections=lambda run_dir: [separation_section(run_dir, data, cfg.preset)])
    return report


def demo_reference(out: Path, seed: int) -> Path:
    """Trusted rows for ``preset=reference`` and ``preset=calibrated``: clean rows generated with another
    seed (the demo's stand-in for the few hundred target-task examples a user would bring)."""
    if not (out / LABELS_FILE).exists():
        write_demo_corpus(out, seed=seed + 2000, n_rows=REFERENCE_ROWS, defect_rate=0.0, eval_questions=1)
    return out / "train"


def demo_models(cfg: DemoConfig) -> tuple[Path, Path]:
    """(selector, target): a tiny OLMoE and a tiny Llama with a tokenizer trained on generated clean rows,
    LM-pretrained on them; cached."""
    from selectmoe.demo.tiny import build_tiny_llama, build_tiny_olmoe, pretrain_tiny_lm

    steps = {"selector_olmoe": cfg.demo.lm_steps, "target_llama": cfg.demo.target_lm_steps}
    key = hash_dict({"version": MODELS_VERSION, "seed": cfg.seed, "steps": steps})
    cache = (
        Path(cfg.demo.cache_dir or Path.home() / ".cache" / "selectmoe" / "demo_models").expanduser() / key
    )
    selector, target = cache / "selector_olmoe", cache / "target_llama"
    if (selector / "config.json").exists() and (target / "config.json").exists():
        return selector, target
    rows, tokenizer = demo_lm_rows(cache / "lm_corpus", cfg.seed)
    for build, out in ((build_tiny_olmoe, selector), (build_tiny_llama, target)):
        with phase(f"demo: building {out.name} and LM-pretraining it {steps[out.name]} steps (cached)"):
            base = build(cache / f"{out.name}_init", seed=cfg.seed, tokenizer=tokenizer)
            pretrain_tiny_lm(
                base,
                rows,
                out,
                steps=steps[out.name],
                seed=cfg.seed,
                learning_rate=LM_LEARNING_RATES[out.name],
            )
    return selector, target


def demo_lm_rows(out: Path, seed: int):
    """(chat rows, tokenizer): the demo models' LM-pretraining rows, generated clean with another seed
    than the corpus (the models never see the rows they later score), and the tokenizer trained on them."""
    from selectmoe.demo.tiny import train_tokenizer

    lm_corpus = write_demo_corpus(out, seed=seed + 1000, n_rows=LM_ROWS, defect_rate=0.0)
    rows = [
        json.loads(line)["messages"]
        for f in sorted((lm_corpus / "train").glob("*.jsonl"))
        for line in f.open()
    ]
    return rows, train_tokenizer(rows, TOKENIZER_VOCAB)


def _selection_score(stage2: Path, manifest: dict, rows: list[dict]) -> np.ndarray:
    if "calibrated" in manifest["metrics"]:
        combiner = json.loads((stage2 / CALIBRATION).read_text())
        return combiner_score(
            combiner, {c: np.array([r[c] for r in rows]) for c in combiner_columns(combiner)}
        )
    scoring = ScoringSection(**manifest["config"]["scoring"])
    if "gate_sign" in manifest["metrics"]:  # the gate weight as the trusted set signed it
        scoring = replace(scoring, gate_weight=manifest["metrics"]["gate_sign"]["gate_weight"])
    terms = {name: np.array([r[name] for r in rows]) for name in score_columns(scoring)}
    common = None
    if "common_ngrams" in manifest["metrics"]:  # scoring.commonness_weight: the corpus's common n-grams
        common = np.asarray(json.loads((stage2 / COMMON_NGRAMS).read_text()), dtype=np.uint32)
    return score_of(terms, scoring, manifest["metrics"].get("term_scales"), common)


def separation_section(run: Path, data: Path, preset: str) -> str:
    """Markdown: AUROC / precision@k of the gate score and the baselines on the held-out rows."""
    scores = pq.read_table(run / STAGE_DIRS["select"] / SCORES_DIR).to_pylist()
    training = run / STAGE_DIRS["pretrain"] / TRAINING_IDS
    trained = set(pq.read_table(training, columns=["id"])["id"].to_pylist()) if training.exists() else set()
    labels = {r["id"]: r for r in map(json.loads, (data / LABELS_FILE).read_text().splitlines())}
    held_out = sorted((r for r in scores if r["id"] not in trained), key=lambda r: r["id"])
    defect = np.array([labels[r["id"]]["defect"] or "" for r in held_out], dtype=object)
    rng = np.random.default_rng(0)
    manifest = json.loads((run / STAGE_DIRS["select"] / MANIFEST).read_text())
    nll_model = {"base": "base model", "stage1": "same model"}[
        manifest["config"]["scoring"].get("nll_model", "stage1")
    ]
    shipped, perplexity_name = f"Select-MoE score (preset={preset})", f"perplexity (-NLL, {nll_model})"
    scorers = {  # the score stage 2 selected by (its scoring keys, term scales with robust_z), or its combiner
        shipped: _selection_score(run / STAGE_DIRS["select"], manifest, held_out),
        "gates alone (mean gate)": row_score(np.array([r["layer_scores"] for r in held_out])),
        perplexity_name: -np.array([r.get("nll", np.nan) for r in held_out]),
        "response length (scored tokens)": np.array([r["n_scored_tokens"] for r in held_out], dtype=float),
        "random": rng.random(len(held_out)),
    }
    k = max(1, manifest["counts"]["rows_selected"])
    datasets = np.array([labels[r["id"]]["dataset"] for r in held_out])
    columns, rows = separation_table(scorers, defect, k, datasets)
    stage1_config = read_manifest(run / STAGE_DIRS["pretrain"])["config"]
    recipe = stage1_config["training"]
    from selectmoe.demo.tiny import final_lm_loss

    selector_lm = final_lm_loss(stage1_config["selector_model"]["path"])
    compared = paired_auroc_difference(scorers[shipped], scorers[perplexity_name], defect == "", datasets)
    (run / SEPARATION).write_text(
        json.dumps({"k": k, "rows": len(held_out), "table": rows, "vs_perplexity": compared}, indent=2)
    )
    kinds = ", ".join(f"{kind} {int((defect == kind).sum())}" for kind in sorted(set(defect) - {""}))
    by_name = {row["scorer"]: row for row in rows}
    gates, score, perplexity = by_name["gates alone (mean gate)"], by_name[shipped], by_name[perplexity_name]
    overall, within = compared["overall"], compared["within_groups"]
    relation = {"above": "above", "level": "level with", "below": "below"}
    verdicts = [
        (
            f"**The gates are inverted on this run**: they rank defective rows above clean ones (AUROC "
            f"{gates['auroc_all']:.3f} < 0.5); a gate opens where the experts lower the LM loss most, which "
            "can be the defective tokens."
        )
        if gates["auroc_all"] < 0.5
        else f"The gates alone rank clean rows above defective ones (AUROC {gates['auroc_all']:.3f}).",
        f"The shipped score is {relation[overall['verdict']]} perplexity here: AUROC {score['auroc_all']:.3f} vs "
        f"{perplexity['auroc_all']:.3f} (difference {overall['difference']:+.3f}, standard error "
        f"{overall['standard_error']:.3f} from a paired bootstrap over these rows); within datasets it is "
        f"{relation[within['verdict']]} it ({within['difference']:+.3f}, standard error "
        f"{within['standard_error']:.3f}). Level means within two standard errors either way.",
    ]
    clean = {i for i, r in labels.items() if not r["defect"]}
    shares = []
    for name, branch in (("the selection", run), ("the random baseline", run / f"{BASELINE_PREFIX}random")):
        selected = branch / STAGE_DIRS["select"] / SELECTED_JSONL
        if selected.exists():
            ids = [json.loads(line)["id"] for line in selected.read_text().splitlines()]
            shares.append(f"{name} {sum(i in clean for i in ids)} of {len(ids)}")
    if shares:
        verdicts.append(
            f"Clean rows in what was selected (the rows stage 3 trains on): {', '.join(shares)}; among the "
            f"held-out rows {int((defect == '').sum()) / len(defect):.0%}."
        )
    return "\n".join(
        [
            "## Do the scores find the planted defects?",
            "",
            f"{len(held_out)} rows not used in stage 1: {int((defect == '').sum())} clean, defective: {kinds}. "
            f"Clean rows are the positives; AUROC 0.5 is chance; precision@{k} is the share of clean rows "
            "among the k best-scored (k = the selection size); within datasets: the mean of the AUROCs "
            "inside each source dataset (a score can rank datasets without telling rows apart), and the "
            "lowest of them.",
            "",
            markdown_table(columns, rows),
            "",
            f"Stage-1 recipe: quality loss `{recipe['quality_loss_type']}`, weight {recipe['quality_loss_weight']}, "
            f"trash expert `{recipe['trash_expert_mode']}`; reference set: "
            f"{'yes' if recipe.get('reference_data') else 'no'}. "
            + (
                f"The selector was LM-pretrained {selector_lm[0]} steps first (training loss over the last tenth "
                f"{selector_lm[1]:.2f}; `demo.lm_steps`). "
                if selector_lm
                else ""
            )
            + "The method is not assumed to work: compare the score and gate rows with the perplexity baseline.",
            "",
            " ".join(verdicts),
        ]
    )

"""Selection quality on real rows: do the scores find planted low-quality rows?

Per seed: a stratified sample of real rows from ``../shared/data/train`` (all four files), split in two
halves. A tiny OLMoE is LM-pretrained on the clean first half. In the second half (the corpus) a
``--defect-rate`` share of rows gets a planted defect (``garbled``, ``shuffled``, ``swapped``,
``truncated``, ``spam``, and ``wrong_answer`` on CoT rows: the final "So the answer is X" changed).
Each variant (a quality-loss recipe) runs the product's stage 1 (``pretrain``: Ray Train on
``--subset-ratio`` of the corpus) and stage 2 (``select``: Ray Data scoring of every row,
top-k selection of ``--percentage`` of the rows stage 1 did not train on). Scores are judged on those
held-out rows only: AUROC clean-vs-defect overall and per kind, and precision@k at the selection size
(the share of clean rows among the k best), next to baselines on the same rows from the same run:
random, perplexity under the same base model, response length. Then the ``diversity`` selection's
coverage of source datasets next to ``top_k`` and ``random`` (same scores, no rescoring).

    .venv/bin/python benchmarks/selection_quality.py                       # full run, ~15 min on 2 cores
    .venv/bin/python benchmarks/selection_quality.py --seeds 0 1 2         # mean over seeds
    .venv/bin/python benchmarks/selection_quality.py --variant lr1e-3:training.learning_rate=1e-3
    .venv/bin/python benchmarks/selection_quality.py --rows 400 --lm-steps 20 --stage1-steps 3 \\
        --variants original --json /tmp/sq.json                            # CI size, ~2 min

``--variant NAME:KEY=VALUE,KEY=VALUE`` adds a stage-1 recipe (keys of the ``pretrain`` config);
``--variants`` picks among the named ones. Prints one table per seed set and writes all numbers with
``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import (
    TRAIN_DIR,
    base_lm_and_replies,
    lm_pretrained_tiny,
    print_table,
    quiet_ray,
    quiet_transformers,
    write_json,
)

from selectmoe.config import PipelineConfig, ScoringSection, load_preset, parse_config
from selectmoe.data import RowError, encode_batch, load_tokenizer, normalize_record
from selectmoe.demo.defects import cot_wrong_answer, plant_defects
from selectmoe.layout import TRAINING_IDS
from selectmoe.metrics import separation_table
from selectmoe.select.score import row_score, score_of, score_terms, term_scales

SCORE_COLUMNS = [
    "id",
    "score",
    "layer_scores",
    "nll",
    "nll_without_prompt",
    "nll_gates_shut",
    "reply_redundancy",
]
PERPLEXITY_WEIGHTS = (0.01, 0.03, 0.1, 0.3)
# (perplexity_weight, prompt_gain_weight) pairs of the combined score
PROMPT_GAIN_WEIGHTS = ((0.03, 0.03), (0.03, 0.1), (0.03, 0.3), (0.1, 0.1), (0.1, 0.3))
EFFECT_WEIGHTS = (0.03, 0.1, 0.3)
BENCH_KINDS = ("garbled", "shuffled", "swapped", "truncated", "spam", "wrong_answer")
# about the LESS mix; oasst1 and the human-written rows are small files, so they are over-sampled
FILE_SHARES = {"cot": 0.35, "flan_v2": 0.35, "oasst1": 0.15, "human_instructions": 0.15}
VARIANTS = {
    "original": [],  # the seed's recipe and defaults: sigmoid loss, weight 0.01, zero trash expert, lr 3e-4
    # the same recipe trained enough to leave its initialisation in this short run (the default preset's stage 1)
    "original_lr1e-2": ["training.learning_rate=1e-2"],
    "mse_w1": [
        "training.quality_loss_type=mse",
        "training.quality_loss_weight=1.0",
        "training.learning_rate=1e-2",
    ],
    "beta_w1": [
        "training.quality_loss_type=beta_moment_matching",
        "training.quality_loss_weight=1.0",
        "training.learning_rate=1e-2",
    ],
    "meanvar_w1": [
        "training.quality_loss_type=mean_variance_regularization",
        "training.quality_loss_weight=1.0",
        "training.learning_rate=1e-2",
    ],
    # gates trained to tell trusted reference rows (clean rows the base model was pretrained on) from the corpus
    "reference": [
        "training.reference_data=[{reference}]",
        "training.quality_loss_weight=0",
        "training.learning_rate=1e-2",
    ],
}


def main() -> None:
    args = parse_args()
    quiet_transformers()
    quiet_ray(dashboard=True)
    variants = {name: VARIANTS[name] for name in args.variants}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        variants[name] = [o for o in overrides.split(",") if o]
    work = Path(args.work_dir)
    started = time.time()
    per_seed = [run_seed(args, seed, variants, work / f"seed{seed}") for seed in args.seeds]
    results = summarise(per_seed)
    k_note = ", ".join(f"seed {r['seed']}: {r['rows']} rows, k={r['k']}" for r in per_seed)
    columns = results["columns"]
    print_table(
        f"Clean-vs-defect separation on held-out real rows (clean = positive; mean over seeds {args.seeds}; {k_note})",
        columns,
        [[row[c] for c in columns] for row in results["table"]],
    )
    cov_columns = results["coverage_columns"]
    print_table(
        "Selections of the same size from the same scores: source-dataset coverage",
        cov_columns,
        [[row[c] for c in cov_columns] for row in results["coverage"]],
    )
    print_table(
        "Other aggregations of the same scoring passes (stored layer scores and NLL)",
        columns,
        [[row[c] for c in columns] for row in results["search"]],
    )
    print(f"\ntotal {time.time() - started:.0f} s")
    write_json(args.json, {"args": vars(args), "variants": variants, **results, "per_seed": per_seed})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(TRAIN_DIR))
    p.add_argument("--work-dir", default="/tmp/selectmoe_selection_quality")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", type=int, default=1500, help="corpus rows (as many again LM-pretrain the model)")
    p.add_argument("--defect-rate", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lm-steps", type=int, default=300, help="LM pretraining steps of the tiny OLMoE")
    p.add_argument("--model", nargs="*", default=[], help="tiny OLMoE config overrides, e.g. hidden_size=128")
    p.add_argument("--reference-rows", type=int, default=300, help="trusted rows (from the clean half)")
    p.add_argument("--subset-ratio", type=float, default=0.4, help="share of the corpus stage 1 trains on")
    p.add_argument("--stage1-steps", type=int, default=40)
    p.add_argument("--stage1-batch", type=int, default=16)
    p.add_argument("--percentage", type=float, default=0.05, help="selection size (share of held-out rows)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--variant", action="append", default=[], help="NAME:KEY=VALUE,... an extra stage-1 recipe"
    )
    p.add_argument("--json", default=None)
    return p.parse_args()


# ---------------------------------------------------------------------------- data


def sample_by_file(data_dir: Path, n: int, seed: int) -> list[dict]:
    """``n`` normalised rows, ``FILE_SHARES`` of them from each file of ``../shared/data/train`` (seeded), in a
    seeded order; from a folder without those files (``eval_corpus.py``'s), an equal share of each."""
    rng = random.Random(seed)
    rows = []
    stems = sorted(path.stem for path in data_dir.glob("*.jsonl"))
    if not stems:
        raise SystemExit(f"{data_dir}: no .jsonl files")
    shares = FILE_SHARES if set(FILE_SHARES) <= set(stems) else {stem: 1 / len(stems) for stem in stems}
    for stem, share in shares.items():
        lines = [line for line in (data_dir / f"{stem}.jsonl").read_text().split("\n") if line.strip()]
        for index in sorted(rng.sample(range(len(lines)), min(len(lines), round(share * n)))):
            try:
                row = normalize_record(json.loads(lines[index]), default_dataset=stem)
            except RowError:
                continue
            rows.append({key: row[key] for key in ("dataset", "id", "messages")})
    rng.shuffle(rows)
    return rows


def write_corpus(
    rows: list[dict], out: Path, defect_rate: float, seed: int, kinds: tuple[str, ...] = BENCH_KINDS
) -> Path:
    """The corpus with planted defects (``kinds``): ``out/train/DATASET.jsonl`` and ``out/labels.jsonl``."""
    rng = random.Random(seed)
    wrong_rng = random.Random(seed + 1)
    labels = plant_defects(
        rng,
        rows,
        defect_rate,
        kinds,
        wrong_reply=lambda i, reply: (
            cot_wrong_answer(reply, wrong_rng) if rows[i]["dataset"] == "cot" else None
        ),
    )
    (out / "train").mkdir(parents=True, exist_ok=True)
    for dataset in sorted({r["dataset"] for r in rows}):
        with (out / "train" / f"{dataset}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["dataset"] == dataset)
    with (out / "labels.jsonl").open("w") as fh:
        fh.writelines(json.dumps(label) + "\n" for label in labels)
    return out


def base_model(args, seed: int, lm_rows: list[dict], cache: Path) -> Path:
    """The tiny OLMoE LM-pretrained on the clean half (cached by its recipe)."""
    overrides = {k: int(v) for k, v in (item.split("=") for item in args.model)}
    return lm_pretrained_tiny("olmoe", seed, lm_rows, args.lm_steps, args.max_length, cache, **overrides)


@torch.inference_mode()
def perplexity_nll(model_dir: Path, rows: list[dict], max_length: int) -> tuple[dict, dict]:
    """id -> mean NLL of the assistant tokens under the base LM (plain transformers OLMoE), with the
    prompts and without them (``encode_replies_alone``, the product's unprompted side)."""
    from selectmoe.select.score import ScorePasses, score_batch

    model, tokenizer, accepted = base_lm_and_replies(model_dir, rows, max_length)
    encoded = [
        {**e, "reply_input_ids": reply["input_ids"], "reply_labels": reply["labels"]}
        for _, e, reply in accepted
    ]
    what = ScorePasses(gates=False, nll=True, reply_only=True)  # the product's pass, on a plain LM
    prompted, unprompted = {}, {}
    for start in range(0, len(encoded), 32):
        ids = [rows[i]["id"] for i, _, _ in accepted[start : start + 32]]
        columns = score_batch(model, encoded[start : start + 32], what, tokenizer.pad_token_id)
        prompted.update(zip(ids, columns["nll"].tolist()))
        unprompted.update(zip(ids, columns["nll_without_prompt"].tolist()))
    return prompted, unprompted


@torch.inference_mode()
def token_level_scores(stage1_dir: Path, rows: list[dict], max_length: int) -> dict[str, dict[str, float]]:
    """Scores the stored stage-2 columns cannot give, from the stage-1 model in plain PyTorch: per row
    (id -> value) the mean gate over every real token (``scoring.tokens=all``), quantiles over the
    assistant tokens of the per-token gate (mean over layers), and the NLL of the assistant tokens with
    every gate forced open (only the experts)."""
    from selectmoe.data import ensure_pad_token
    from selectmoe.data.collate import collate
    from selectmoe.models.loading import load_select_moe
    from selectmoe.models.modeling import gates_forced
    from selectmoe.select.score import row_nll, score_mask

    model = load_select_moe(str(stage1_dir), dtype="float32").eval()
    tokenizer = ensure_pad_token(load_tokenizer(str(stage1_dir / "tokenizer")))
    encoded = encode_batch([r["messages"] for r in rows], tokenizer, max_seq_length=max_length)
    pairs = [(r["id"], e) for r, e in zip(rows, encoded) if isinstance(e, dict)]
    out: dict[str, dict[str, float]] = {}

    def put(name: str, ids: list[str], values) -> None:
        out.setdefault(name, {}).update(zip(ids, np.asarray(values, dtype=float).tolist()))

    for start in range(0, len(pairs), 32):
        ids = [i for i, _ in pairs[start : start + 32]]
        batch = collate(
            [e for _, e in pairs[start : start + 32]], tokenizer.pad_token_id, torch.device("cpu")
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        assistant = score_mask(batch["attention_mask"], batch["labels"], "assistant")
        every = score_mask(batch["attention_mask"], batch["labels"], "all")
        records = model.model(**inputs, output_router_logits=True).router_logits
        gates = torch.sigmoid(torch.stack([r["quality_score"][..., 0] for r in records], -1)).mean(-1)
        put("all tokens", ids, (gates * every).sum(1) / every.sum(1).clamp(min=1))
        for q in (0.1, 0.5, 0.9):
            quantiles = [
                np.quantile(g[m].numpy(), q) if m.any() else np.nan for g, m in zip(gates, assistant)
            ]
            put(f"token q{round(q * 100)}", ids, quantiles)
        with gates_forced(model, 1.0):
            hidden = model.model(**inputs).last_hidden_state
        put("nll gates open", ids, row_nll(model, hidden, batch["input_ids"], assistant))
    return out


# ---------------------------------------------------------------------------- stages


def run_stages(
    args,
    corpus: Path,
    model: Path,
    out: Path,
    seed: int,
    overrides: list[str],
    select_overrides: tuple = (),
    stage2_name: str = "stage2",
):
    """Stage 1 (``overrides``: its recipe) then stage 2 of the product on the corpus, every score term
    stored; returns (stage-2 config, stage-2 folder). A stage 1 already finished in ``out`` is reused (its
    folder name is the recipe's hash), and ``stage2_name`` names the stage-2 folder."""
    from selectmoe.layout import MANIFEST, STAGE1_CONFIG
    from selectmoe.pretrain import pretrain
    from selectmoe.select import select

    data = [f"dataset.data_path=[{corpus / 'train'}]", f"dataset.max_sequence_length={args.max_length}"]
    stage1 = parse_config(
        "pretrain",
        overrides=[
            *data,
            f"seed={seed}",
            f"output_dir={out / 'stage1'}",
            f"selector_model.path={model}",
            f"dataset.subset_ratio={args.subset_ratio}",
            f"training.max_steps={args.stage1_steps}",
            f"training.batch_size={args.stage1_batch}",
            "training.per_device_batch_size=8",
            "training.gradient_checkpointing=false",
            "training.checkpoint_every_steps=0",
            "scaling.num_workers=1",
            *overrides,
        ],
    )
    if not ((out / "stage1" / STAGE1_CONFIG).exists() and (out / "stage1" / MANIFEST).exists()):
        pretrain(stage1)
    stage2 = parse_config(
        "select",
        overrides=[
            *data,
            f"seed={seed}",
            f"output_dir={out / stage2_name}",
            f"model_checkpoint_path={out / 'stage1'}",
            f"selection_percentage={args.percentage}",
            "scoring.store_routing=true",
            "scoring.lm_loss=true",
            "scoring.prompt_gain=true",
            "scoring.expert_effect=true",
            *select_overrides,
        ],
    )
    return stage2, select(stage2)


def reselect(stage2_cfg, method: str) -> list[dict]:
    """The same stage 2 with another selection method: scores are reused, nothing is rescored."""
    from selectmoe.select import select

    cfg = copy.deepcopy(stage2_cfg)
    cfg.selection.method = method
    out = select(cfg)
    return pq.read_table(out / "selected.parquet", columns=["id", "dataset"]).to_pylist()


# ---------------------------------------------------------------------------- one seed


def run_seed(args, seed: int, variants: dict[str, list[str]], work: Path) -> dict:
    rows = sample_by_file(Path(args.data_dir), 2 * args.rows, seed)
    lm_rows, corpus_rows = rows[::2], rows[1::2]
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    write_corpus(corpus_rows, corpus, args.defect_rate, seed)
    model = base_model(args, seed, lm_rows, work.parent / "models")
    reference = work / "reference.jsonl"
    reference.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lm_rows[: args.reference_rows])
    )
    labels = {r["id"]: r["defect"] or "" for r in map(json.loads, (corpus / "labels.jsonl").open())}
    nll, nll_without_prompt = perplexity_nll(model, corpus_rows, args.max_length)

    scores, aggregations, held_out, timings, first_cfg = {}, {}, None, {}, None
    for name, overrides in variants.items():
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        overrides = [o.format(reference=reference) for o in overrides]
        stage2_cfg, stage2 = run_stages(args, corpus, model, out, seed, overrides)
        first_cfg = first_cfg or stage2_cfg
        timings[name] = round(time.time() - t0, 1)
        trained = set(pq.read_table(out / "stage1" / TRAINING_IDS, columns=["id"])["id"].to_pylist())
        table = pq.read_table(stage2 / "scores", columns=[*SCORE_COLUMNS, "n_scored_tokens"]).to_pylist()
        by_id = {r["id"]: r for r in table if r["id"] not in trained}
        if held_out is None:
            held_out = sorted(by_id)
            lengths = np.array([by_id[i]["n_scored_tokens"] for i in held_out], dtype=float)
        elif sorted(by_id) != held_out:
            raise RuntimeError(f"variant {name}: stage 1 trained on other rows than the first variant")
        scores[f"gates: {name}"] = np.array([by_id[i]["score"] for i in held_out])
        records = [by_id[i] for i in held_out]
        aggregations.update(score_aggregations(name, records))
        held_out_rows = [row for row in corpus_rows if row["id"] in by_id]
        token_level = token_level_scores(out / "stage1", held_out_rows, args.max_length)
        aggregations.update(token_level_aggregations(name, records, token_level))

    defect = np.array([labels[i] for i in held_out], dtype=object)
    base_nll = np.array([nll.get(i, np.nan) for i in held_out])
    base_gain = np.array([nll_without_prompt.get(i, np.nan) for i in held_out]) - base_nll
    baselines = {
        "perplexity (-NLL, base model)": -base_nll,
        "response length (tokens)": lengths,
        "random": np.random.default_rng(seed).random(len(held_out)),
    }
    k = max(1, int(args.percentage * len(held_out)))
    columns, table = separation_table({**scores, **baselines}, defect, k)
    base_model_scores = {
        "perplexity (-NLL, base model)": -base_nll,
        "prompt gain alone (base model)": base_gain,
        **{f"-NLL + {v} x prompt gain (base model)": -base_nll + v * base_gain for v in (0.5, 1.0, 2.0)},
    }
    _, search = separation_table({**aggregations, **base_model_scores}, defect, k)
    coverage = coverage_table(
        {method: reselect(first_cfg, method) for method in ("top_k", "diversity", "random")},
        {i: r for i, r in zip(held_out, defect)},
        {r["id"]: r["dataset"] for r in corpus_rows if r["id"] in set(held_out)},
    )
    return {
        "seed": seed,
        "rows": len(held_out),
        "k": k,
        "defects": {kind: int((defect == kind).sum()) for kind in sorted(set(defect))},
        "columns": [c.replace(f"precision_at_{k}", "precision_at_k") for c in columns],
        "table": [
            {key.replace(f"precision_at_{k}", "precision_at_k"): v for key, v in row.items()} for row in table
        ],
        "coverage": coverage,
        "search": [
            {key.replace(f"precision_at_{k}", "precision_at_k"): v for key, v in row.items()}
            for row in search
        ],
        "stage_seconds": timings,
    }


def score_aggregations(name: str, records: list[dict]) -> dict[str, np.ndarray]:
    """Other row scores from the same scoring passes (stored layer scores, NLL with and without the
    prompts): single layers, the reversed direction, perplexity under the stage-1 model, and the
    product's formula with NLL and prompt-gain weights."""
    layers = np.array([r["layer_scores"] for r in records])
    gates = np.array([r["score"] for r in records])
    nll = np.array([r["nll"] for r in records])
    unprompted = np.array([r["nll_without_prompt"] for r in records])
    out = {f"{name}: first layer": layers[:, 0], f"{name}: last layer": layers[:, -1]}
    out[f"{name}: reversed (1 - score)"] = 1 - gates
    out[f"{name}: -NLL (stage-1 model, same pass)"] = -nll
    for weight in PERPLEXITY_WEIGHTS:
        out[f"{name}: gates - {weight} x NLL"] = row_score(layers, nll, weight)  # the product's formula
    out[f"{name}: prompt gain alone"] = unprompted - nll
    for weight, gain_weight in PROMPT_GAIN_WEIGHTS:
        label = f"{name}: gates - {weight} x NLL + {gain_weight} x prompt gain"
        out[label] = row_score(layers, nll, weight, unprompted, gain_weight)
    # the default preset's score, its term scales (robust z, the prompt gain's median) over these rows
    default = ScoringSection(**load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"])
    columns = {"layer_scores": layers, "nll": nll, "nll_without_prompt": unprompted}
    redundancy = np.array([r["reply_redundancy"] for r in records])
    out[f"{name}: the default preset's score ({PipelineConfig().preset})"] = score_of(
        {**columns, "reply_redundancy": redundancy}, default, term_scales(score_terms(**columns))
    )
    return out


def token_level_aggregations(
    name: str, records: list[dict], token_level: dict[str, dict[str, float]]
) -> dict[str, np.ndarray]:
    """Scores from ``token_level_scores`` (other token sets and quantiles) and the expert effect, the
    stage-2 ``nll_gates_shut - nll`` (``scoring.expert_effect``), alone, against the gates forced open,
    and added to the default preset's score."""
    ids = [r["id"] for r in records]
    column = {key: np.array([values.get(i, np.nan) for i in ids]) for key, values in token_level.items()}
    layers = np.array([r["layer_scores"] for r in records])
    nll = np.array([r["nll"] for r in records])
    unprompted = np.array([r["nll_without_prompt"] for r in records])
    shut = np.array([r["nll_gates_shut"] for r in records])
    effect = shut - nll
    out = {f"{name}: mean gate over all tokens": column["all tokens"]}
    out.update(
        {f"{name}: gate {q} over assistant tokens": column[f"token {q}"] for q in ("q10", "q50", "q90")}
    )
    out[f"{name}: -NLL, gates forced open"] = -column["nll gates open"]
    out[f"{name}: expert effect (NLL shut - NLL)"] = effect
    out[f"{name}: expert effect, gates open (NLL shut - NLL open)"] = shut - column["nll gates open"]
    scoring = load_preset("gates_prompt_gain")["keys"]["select"]["scoring"]
    default_terms = (layers, nll, scoring["perplexity_weight"], unprompted, scoring["prompt_gain_weight"])
    for weight in EFFECT_WEIGHTS:  # the product's formula with scoring.expert_effect_weight
        label = f"{name}: gates_prompt_gain score + {weight} x expert effect"
        out[label] = row_score(*default_terms, shut, weight)
    return out


def coverage_table(
    selections: dict[str, list[dict]], defect: dict[str, str], dataset_of: dict[str, str]
) -> list:
    """Per selection method: the share of each source dataset (vs the held-out rows), datasets covered,
    normalised entropy of the dataset mix, and the clean share."""
    datasets = sorted(set(dataset_of.values()))
    pool = {"method": "held-out rows (the pool)", **_mix(list(dataset_of.values()), datasets)}
    pool["clean_share"] = float(np.mean([defect[i] == "" for i in dataset_of]))
    rows = [pool]
    for method, chosen in selections.items():
        row = {"method": method, **_mix([r["dataset"] for r in chosen], datasets)}
        row["clean_share"] = float(np.mean([defect[r["id"]] == "" for r in chosen]))
        rows.append(row)
    return rows


def _mix(names: list[str], datasets: list[str]) -> dict:
    counts = np.array([names.count(d) for d in datasets], dtype=float)
    shares = counts / max(1.0, counts.sum())
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(len(datasets))) if len(datasets) > 1 else 1.0
    return {
        **{f"share_{d}": float(s) for d, s in zip(datasets, shares)},
        "datasets_covered": int((counts > 0).sum()),
        "entropy": entropy,
    }


def summarise(per_seed: list[dict]) -> dict:
    """Mean over seeds of every number in the separation and coverage tables (std in ``*_std``)."""

    def mean_rows(key: str, label: str) -> tuple[list[str], list[dict]]:
        columns = (
            per_seed[0][key + "_columns"] if key + "_columns" in per_seed[0] else list(per_seed[0][key][0])
        )
        rows = []
        for index, first in enumerate(per_seed[0][key]):
            row = {label: first[label]}
            for column in columns[1:]:
                values = [seed[key][index][column] for seed in per_seed]
                row[column] = float(np.nanmean(values))
                if len(values) > 1:
                    row[f"{column}_std"] = float(np.nanstd(values))
            rows.append(row)
        return columns, rows

    for seed in per_seed:
        seed["table_columns"] = seed.pop("columns")
    columns, table = mean_rows("table", "scorer")
    cov_columns, coverage = mean_rows("coverage", "method")
    for seed in per_seed:
        seed["search_columns"] = seed["table_columns"]
    _, search = mean_rows("search", "scorer")
    return {
        "columns": columns,
        "table": table,
        "coverage_columns": cov_columns,
        "coverage": coverage,
        "search": search,
    }


if __name__ == "__main__":
    sys.exit(main())

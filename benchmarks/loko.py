"""Which row score generalises? Weights chosen leave-one-defect-kind-out, judged on kinds never tuned on.

Runs the product's stage 1 (``pretrain``) and stage 2 (``select``, every score term stored) on real rows
from ``../shared/data/train`` (``--data-dir``: another folder, such as ``eval_corpus.py``'s corpus no key
was chosen on; the base is LM-pretrained on other rows of the same folder) with planted defects, over a
grid of runs: selector sizes (``--sizes``), LM-pretraining of the base (``--bases``: a barely and a well
pretrained selector, 30 and 300 steps, and one at its held-out plateau, 600 steps), stage-1 regimes
(``--regimes``: the seed's lr 3e-4 / 40 steps and lr 1e-2 / 60 steps) and seeds. Each run's per-row
terms (mean gate, NLL, prompt gain, expert effect; perplexity under the base model) are cached, so the
analysis reruns without rescoring.

Candidate recipes are the product's robust-z formula (``scoring.combine=robust_z``) over a weight grid
on z(mean gate), z(-NLL), z(prompt gain), z(expert effect). The analysis:

- **Leave one kind out.** For each planted kind K, the recipe with the best worst-kind AUROC over the
  other kinds (mean over every run) is chosen without K, then judged on K. The worst of those held-out
  AUROCs is the honest estimate of how the choice generalises to a new kind of defect.
- **Kinds no robust-z weight saw.** ``empty_ish``, ``looped`` and ``echo`` are planted too and kept out
  of every choice of the grid; they are judged only (looped and echo chose the raw recipes' reply
  redundancy weight and tolerance, so for those they are not unseen).
- **Item 9's rule** (issue 19): among the recipes not below perplexity on the planted kinds nor within
  any source dataset, in each size/base (a paired test over its seeds, each seed's regimes averaged), the
  best worst kind; also left one kind out.
- **A held-out corpus** (``--check-on RUN``): the named recipes judged on a ``selectmoe demo`` run's rows
  (generated, never used to choose a weight; run it with ``select.scoring.expert_effect=true``).
- **Per regime**: for the default preset's recipe, the recipe chosen on every planted kind, gates alone
  and perplexity: AUROC on the planted kinds, the worst planted kind, the unseen kinds, the mean and the
  lowest AUROC within a source dataset, and precision at 5%.

    .venv/bin/python benchmarks/loko.py --seeds 0 1 2 3 4 --d2 --json benchmarks/results/loko.json  # ~2 h
    .venv/bin/python benchmarks/loko.py --sizes small medium --seeds 0 --bases plateau --json ...  # 4 x 256
    .venv/bin/python benchmarks/loko.py --sizes small medium --seeds 0 --bases 1500 --lm-rows 12000 ...
    .venv/bin/python benchmarks/loko.py --cached-only --seeds 0 1 2 3 4 --d2 --check-on /tmp/demo_heldout ...
    .venv/bin/python benchmarks/loko.py --merge benchmarks/results/loko_sizes_plateau.json \\
        benchmarks/results/loko_sizes_plateau_seeds234.json      # the seeds of two sessions, together
    .venv/bin/python benchmarks/loko.py --tiny --json /tmp/loko.json                            # CI size
    .venv/bin/python benchmarks/loko.py --nll-model stage1 --cached-only ...  # runs from before nll_model=base

Stage 2 measures the NLLs as ``--nll-model`` says, by default as the default preset does (the base model;
runs named ``_nllbase``); a stage-1 model already trained for a run is reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
from common import TRAIN_DIR, lm_pretrained_tiny, print_table, quiet_ray, quiet_transformers, write_json
from selection_quality import BENCH_KINDS, perplexity_nll, run_stages, sample_by_file, write_corpus

from selectmoe.config import PipelineConfig, ScoringSection, load_preset
from selectmoe.demo.corpus import LABELS_FILE
from selectmoe.layout import MANIFEST, SCORES_DIR, STAGE_DIRS, TRAINING_IDS
from selectmoe.manifest import hash_dict
from selectmoe.metrics import auroc, auroc_within_groups, precision_at_k
from selectmoe.select.score import score_formula, score_of, score_terms, term_scales

# planted and judged, never used to choose a robust-z weight (looped and echo chose the redundancy weight)
UNSEEN_KINDS = ("empty_ish", "looped", "echo")
SIZES = {
    "small": {},  # the tiny OLMoE of the tests and the demo: 2 layers, hidden 64
    "medium": {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 128},
}
# LM-pretraining steps of the selector before stage 1; "plateau": where both sizes' held-out loss is
# lowest (lm_plateau.py; past it they overfit the LM rows), "strong" is short of it
BASES = {"weak": 30, "strong": 300, "plateau": 600}
REGIMES = {"seed": (3e-4, 40), "fast": (1e-2, 60)}  # stage 1: learning rate, steps
# weights on z(mean gate), z(-NLL), z(prompt gain), z(expert effect), z(driving force D2; with --d2)
GRID = {
    "gate": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "nll": (0.0, 0.5, 1.0, 2.0),
    "prompt_gain": (0.0, 0.25, 0.5, 1.0, 2.0),
    "expert_effect": (-0.5, 0.0, 0.5, 1.0),
    "driving_force": (-1.0, -0.5, 0.0, 0.5, 1.0),
}
# a recipe: (gate, -NLL, prompt gain, expert effect, D2 weights, scoring.combine, scoring.prompt_gain_cap,
# reply redundancy weight, its tolerance)
D2_WEIGHT = 4
# beside the grid: -NLL + prompt gain in nats (scoring.combine=raw), both terms in the same unit, so the
# prompt gain weighs as much as the information it carries on this model (little on a weak base); and
# the same with the prompt gain capped at its median (a penalty for replies the prompt does not explain,
# no reward for the high per-token gain of short and cut-off replies), and at its lower quartile
RAW_RECIPES = (
    *((0.0, 1.0, 1.0, 0.0, 0.0, "raw", cap, 0.0, 0.0) for cap in ("none", "median", "lower_quartile")),
    # minus w x the reply redundancy beyond a tolerance t: (w, t)
    *(
        (0.0, 1.0, 1.0, 0.0, 0.0, "raw", "lower_quartile", w, t)
        for w, t in (
            (0.5, 0.0),
            (1.0, 0.0),
            (2.0, 0.0),
            (2.0, 0.2),
            (4.0, 0.2),
            (2.0, 0.3),
            (4.0, 0.3),
            (4.0, 0.4),
            (8.0, 0.4),
        )
    ),
    (0.0, 0.0, 1.0, 0.0, 0.0, "raw", "none", 8.0, 0.4),  # the default without its -NLL term
)
PERPLEXITY = "perplexity (-NLL, base model)"
NLL_BASE_FILES = ("stage2_base", "terms_base.json")  # --nll-model base: stage 2's folder, the cached terms


def main() -> None:
    args = parse_args()
    if args.merge:
        results = merge_results([Path(path) for path in args.merge])
        print_merged(results)
        write_json(args.json, {"args": vars(args), **results})
        return
    quiet_transformers()
    quiet_ray(dashboard=True)
    started = time.time()
    runs = {}
    for seed, size, base in itertools.product(
        args.seeds, args.sizes, args.bases
    ):  # seed-major: stop any time
        runs.update(run_model(args, size, base, seed))
    recipes = recipe_grid(args.d2)
    judged = {name: judge(terms, recipes, args.percentage) for name, terms in runs.items()}
    results = analyse(judged, recipes)
    results["clean_over_redundancy_tolerance"] = clean_over_redundancy_tolerance(runs)
    if args.check_on:
        results["held_out_corpus"] = check_on_demo(Path(args.check_on), results["named"], recipes, args)
    print_results(results, len(runs))
    print(f"\ntotal {time.time() - started:.0f} s")
    write_json(args.json, {"args": vars(args), "grid": GRID, "runs": sorted(runs), **results})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(TRAIN_DIR))
    p.add_argument("--work-dir", default="/tmp/selectmoe_loko")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sizes", nargs="+", default=["small"], choices=list(SIZES))
    p.add_argument(
        "--bases",
        nargs="+",
        default=["weak", "strong"],
        type=base_name,
        help=f"{', '.join(f'{name} ({steps} LM steps)' for name, steps in BASES.items())}, or a step count",
    )
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--rows", type=int, default=1500, help="corpus rows (as many again LM-pretrain the base)")
    p.add_argument(
        "--lm-rows",
        type=int,
        default=None,
        help="LM-pretrain the base on this many rows of the data outside the corpus instead (item 7: a "
        "base that is a better language model than the corpus's twin half allows)",
    )
    p.add_argument(
        "--tokenizer-vocab",
        type=int,
        default=None,
        help="give each base a byte-level BPE of this size trained on its LM rows instead of the 32k "
        "tokenizer (the 32k LM head is most of a small selector's step)",
    )
    p.add_argument(
        "--nll-model",
        default=load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"].get("nll_model", "stage1"),
        choices=["stage1", "base"],
        help="stage 2's scoring.nll_model (default: the default preset's): base measures every NLL term "
        "with the model stage 1 started from (cached apart: terms_base.json, stage2_base/; the runs' "
        "names end in _nllbase), stage1 with the stage-1 model (the runs before it existed)",
    )
    p.add_argument("--defect-rate", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--subset-ratio", type=float, default=0.4, help="share of the corpus stage 1 trains on")
    p.add_argument("--stage1-batch", type=int, default=16)
    p.add_argument("--percentage", type=float, default=0.05, help="precision at this share of the rows")
    p.add_argument("--tiny", action="store_true", help="CI size: 200 rows, 5/10 LM steps, 3 stage-1 steps")
    p.add_argument(
        "--d2", action="store_true", help="add the driving force D2 (scoring.driving_force) to the grid"
    )
    p.add_argument("--cached-only", action="store_true", help="analyse the runs already cached; run nothing")
    p.add_argument(
        "--check-on",
        default=None,
        help="a `selectmoe demo` run folder scored with select.scoring.expert_effect=true: the named "
        "recipes judged on its held-out rows, a corpus no weight was chosen on",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: the mean over the `per_run` rows of these results files (runs of several "
        "sessions, e.g. other seeds), per size/base, each recipe paired with perplexity",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.lm_steps = {"weak": 5, "strong": 10, "plateau": 20} if args.tiny else dict(BASES)
    args.lm_steps.update({base: int(base) for base in args.bases if base.isdigit()})
    args.stage1_steps = 3 if args.tiny else None  # None: the regime's own length
    if args.tiny:
        args.rows = 200
    return args


def base_name(text: str) -> str:
    if text not in BASES and not text.isdigit():
        raise argparse.ArgumentTypeError(f"a base is one of {', '.join(BASES)} or a number of LM steps")
    return text


# ---------------------------------------------------------------------------- runs


def lm_and_corpus_rows(data_dir: Path, rows: int, lm_rows: int | None, seed: int) -> tuple[list, list]:
    """The seed's corpus rows (the same whatever ``lm_rows``) and the rows its base is LM-pretrained on:
    by default the other half of the same sample; with ``lm_rows``, that many rows of every file in a
    seeded order, none of them in the corpus."""
    sampled = sample_by_file(data_dir, 2 * rows, seed)
    corpus_rows = sampled[1::2]
    if lm_rows is None:
        return sampled[::2], corpus_rows
    in_corpus = {r["id"] for r in corpus_rows}
    every_row = sample_by_file(data_dir, 10**9, seed + 1)  # a share of 10**9 rows is every row of each file
    pool = [r for r in every_row if r["id"] not in in_corpus]
    if len(pool) < lm_rows:
        raise SystemExit(f"--lm-rows {lm_rows}: only {len(pool)} rows of {data_dir} are outside the corpus")
    return pool[:lm_rows], corpus_rows


def run_model(args, size: str, base: str, seed: int) -> dict[str, dict]:
    """Every regime's stage 1 + stage 2 on one base model and one corpus; run name -> per-row terms
    (cached by the run's recipe in the work folder)."""
    lm_steps = args.lm_steps[base]
    recipe = {
        "size": size, "base_steps": lm_steps, "seed": seed, "rows": args.rows,
        "defect_rate": args.defect_rate, "max_length": args.max_length, "subset_ratio": args.subset_ratio,
        "stage1_batch": args.stage1_batch, "stage1_steps": args.stage1_steps,
        **({"lm_rows": args.lm_rows} if args.lm_rows else {}),
        **({"tokenizer_vocab": args.tokenizer_vocab} if args.tokenizer_vocab else {}),
        # another corpus (eval_corpus.py's) is another run; the train folder's runs keep their names
        **({"data_dir": str(Path(args.data_dir).resolve())} if Path(args.data_dir).resolve() != TRAIN_DIR.resolve() else {}),
    }  # fmt: skip
    base = f"{base}_lm{args.lm_rows}" if args.lm_rows else base  # the run's name
    base = f"{base}_tok{args.tokenizer_vocab}" if args.tokenizer_vocab else base
    work = Path(args.work_dir) / f"{size}_{base}_seed{seed}_{hash_dict(recipe)}"  # the stage-1 recipe's
    stage2_name, terms_name = ("stage2", "terms.json") if args.nll_model == "stage1" else NLL_BASE_FILES
    base = f"{base}_nllbase" if args.nll_model == "base" else base
    cached = {regime: work / regime / terms_name for regime in args.regimes}
    if args.cached_only or all(path.exists() for path in cached.values()):
        return {
            f"{size}/{base}/{regime}/seed{seed}": with_driving_force(
                args,
                work,
                regime,
                with_reply_redundancy(args, work, regime, json.loads(path.read_text())),
                path,
            )
            for regime, path in cached.items()
            if path.exists()
        }
    lm_rows, corpus_rows = lm_and_corpus_rows(Path(args.data_dir), args.rows, args.lm_rows, seed)
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    write_corpus(corpus_rows, corpus, args.defect_rate, seed, (*BENCH_KINDS, *UNSEEN_KINDS))
    model = lm_pretrained_tiny(
        "olmoe",
        seed,
        lm_rows,
        lm_steps,
        args.max_length,
        Path(args.work_dir) / "models",
        args.tokenizer_vocab,
        **SIZES[size],
    )
    labels = {r["id"]: r for r in map(json.loads, (corpus / "labels.jsonl").open())}
    base_nll, _ = perplexity_nll(model, corpus_rows, args.max_length)
    out = {}
    for regime in args.regimes:
        learning_rate, steps = REGIMES[regime]
        stage_args = SimpleNamespace(**{**vars(args), "stage1_steps": args.stage1_steps or steps})
        _, stage2 = run_stages(
            stage_args,
            corpus,
            model,
            work / regime,
            seed,
            [f"training.learning_rate={learning_rate}"],
            [f"scoring.nll_model={args.nll_model}"],
            stage2_name,
        )
        terms = held_out_terms(stage2 / SCORES_DIR, work / regime / "stage1" / TRAINING_IDS, labels, base_nll)
        cached[regime].write_text(json.dumps(terms))
        terms = with_reply_redundancy(args, work, regime, terms)
        out[f"{size}/{base}/{regime}/seed{seed}"] = with_driving_force(
            args, work, regime, terms, cached[regime]
        )
    return out


def held_out_terms(scores: Path, training_ids: Path, labels: dict, base_nll: dict) -> dict:
    """Per-row terms (sorted by id) of the scored rows stage 1 did not train on: label, source dataset,
    mean gate, the NLLs stage 2 stored, and ``base_nll`` (id -> NLL under the base model)."""
    trained = set(pq.read_table(training_ids, columns=["id"])["id"].to_pylist())
    columns = ["id", "layer_scores", "nll", "nll_without_prompt", "nll_gates_shut"]
    scored = [r for r in pq.read_table(scores, columns=columns).to_pylist() if r["id"] not in trained]
    scored.sort(key=lambda r: r["id"])
    return {
        "id": [r["id"] for r in scored],
        "defect": [labels[r["id"]]["defect"] or "" for r in scored],
        "dataset": [labels[r["id"]]["dataset"] for r in scored],
        "gate": [float(np.mean(r["layer_scores"])) for r in scored],
        **{c: [r[c] for r in scored] for c in ("nll", "nll_without_prompt", "nll_gates_shut")},
        "base_nll": [base_nll.get(r["id"], float("nan")) for r in scored],
    }


def encoded_terms_rows(args, work: Path, regime: str, terms: dict):
    """(the run's tokenizer, the product's encoding of the corpus rows ``terms`` holds, in its order)."""
    from selectmoe.data import encode_batch, ensure_pad_token, load_tokenizer

    tokenizer = ensure_pad_token(load_tokenizer(str(work / regime / "stage1" / "tokenizer")))
    rows = {
        r["id"]: r
        for f in sorted((work / "corpus" / "train").glob("*.jsonl"))
        for r in map(json.loads, f.open())
    }
    encoded = encode_batch(
        [rows[i]["messages"] for i in terms["id"]], tokenizer, max_seq_length=args.max_length
    )
    return tokenizer, encoded


def with_reply_redundancy(args, work: Path, regime: str, terms: dict) -> dict:
    """The terms with each row's ``reply_redundancy``: the product's function on the product's encoding of
    the corpus rows, as stage 2 computes it. It needs no model, so it is computed afresh each time (never
    cached): runs scored before its definition changed get the current one without rescoring."""
    from selectmoe.select.score import reply_redundancy

    _, encoded = encoded_terms_rows(args, work, regime, terms)
    return {**terms, "reply_redundancy": [reply_redundancy(e["input_ids"], e["labels"]) for e in encoded]}


def with_driving_force(args, work: Path, regime: str, terms: dict, cache: Path) -> dict:
    """With ``--d2``: the terms with each row's mean D2 over layers, from the product's scorer
    (``GateScorer``, ``scoring.driving_force=true``) on the run's stage-1 model (cached beside the terms)."""
    if not args.d2 or "driving_force" in terms:
        return terms
    from selectmoe.config import ScoringSection
    from selectmoe.select.scorer import GateScorer

    stage1 = work / regime / "stage1"
    tokenizer, encoded = encoded_terms_rows(args, work, regime, terms)
    scorer = GateScorer(
        str(stage1),
        scoring=ScoringSection(driving_force=True),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    columns = scorer(
        {
            "id": np.array(terms["id"]),
            "dataset": np.array(terms["dataset"]),
            "input_ids": [e["input_ids"] for e in encoded],
            "labels": [e["labels"] for e in encoded],
        }
    )
    terms = {**terms, "driving_force": [float(np.mean(d)) for d in columns["driving_force"]]}
    cache.write_text(json.dumps(terms))
    return terms


# ---------------------------------------------------------------------------- recipes and judging


def recipe_grid(d2: bool) -> dict[str, tuple]:
    """Formula text -> recipe: every grid point but all zeros as robust z-scores (D2's weight stays 0
    without ``d2``), and ``RAW_RECIPES``."""
    recipes = {}
    for weights in itertools.product(*GRID.values()):
        if any(weights) and (d2 or weights[-1] == 0):
            recipes[formula((*weights, "robust_z", "none", 0.0, 0.0))] = (
                *weights,
                "robust_z",
                "none",
                0.0,
                0.0,
            )
    for recipe in RAW_RECIPES:
        recipes[formula(recipe)] = recipe
    return recipes


def scoring_of(recipe: tuple) -> ScoringSection:
    """The ``scoring`` config section a recipe stands for."""
    gate, nll, gain, effect, d2, combine, cap, redundancy, tolerance = recipe
    return ScoringSection(
        combine=combine, prompt_gain_cap=cap, gate_weight=gate, perplexity_weight=nll,
        prompt_gain_weight=gain, expert_effect_weight=effect, driving_force_weight=d2,
        redundancy_weight=redundancy, redundancy_tolerance=tolerance,
    )  # fmt: skip


def formula(recipe: tuple) -> str:
    return score_formula(scoring_of(recipe))


def recipe_scores(terms: dict, recipe: tuple) -> np.ndarray:
    """The product's row score (``score_of``), with the term scales (robust z-scores, the prompt gain's
    median) over these rows."""
    columns = {
        "layer_scores": np.asarray(terms["gate"], dtype=float)[:, None],
        **{c: np.asarray(terms[c], dtype=float) for c in ("nll", "nll_without_prompt", "nll_gates_shut")},
    }
    if "driving_force" in terms:
        columns["driving_force"] = np.asarray(terms["driving_force"], dtype=float)[:, None]
    scales = term_scales(score_terms(**columns))  # the redundancy is a share: never scaled
    redundancy = np.asarray(terms["reply_redundancy"], dtype=float)
    return score_of({**columns, "reply_redundancy": redundancy}, scoring_of(recipe), scales)


def judge(terms: dict, recipes: dict, percentage: float) -> dict[str, dict[str, float]]:
    """Scorer -> AUROC per kind (clean vs that kind), over the planted kinds, over the unseen kinds,
    within source datasets (planted kinds; mean and lowest), precision at ``percentage``."""
    defect = np.asarray(terms["defect"], dtype=object)
    datasets = np.asarray(terms["dataset"])
    clean = defect == ""
    planted, unseen = np.isin(defect, BENCH_KINDS), np.isin(defect, UNSEEN_KINDS)
    k = max(1, int(percentage * len(defect)))
    scorers = {name: recipe_scores(terms, weights) for name, weights in recipes.items()}
    scorers[PERPLEXITY] = -np.asarray(terms["base_nll"], dtype=float)
    scorers["random"] = np.random.default_rng(len(defect)).random(len(defect))
    out = {}
    for name, scores in scorers.items():
        row = {
            kind: auroc(scores[clean | (defect == kind)], clean[clean | (defect == kind)])
            for kind in (*BENCH_KINDS, *UNSEEN_KINDS)
        }
        row["planted"] = auroc(scores[clean | planted], clean[clean | planted])
        row["unseen"] = auroc(scores[clean | unseen], clean[clean | unseen])
        within = auroc_within_groups(
            scores[clean | planted], clean[clean | planted], datasets[clean | planted]
        )
        row["within_datasets"] = float(np.mean(list(within.values()))) if within else float("nan")
        row["worst_dataset"] = min(within.values(), default=float("nan"))
        row["precision_at_5pct"] = precision_at_k(scores, clean, k)
        row.update({f"dataset/{dataset}": value for dataset, value in within.items()})
        for kind in BENCH_KINDS:  # the same without one kind: a leave-one-kind-out choice must not see it
            rows = clean | (planted & (defect != kind))
            row[f"planted/without/{kind}"] = auroc(scores[rows], clean[rows])
            for dataset, value in auroc_within_groups(scores[rows], clean[rows], datasets[rows]).items():
                row[f"dataset/{dataset}/without/{kind}"] = value
        out[name] = row
    return out


# ---------------------------------------------------------------------------- analysis


def clean_over_redundancy_tolerance(runs: dict[str, dict]) -> dict[str, float]:
    """Per source dataset, the share of its clean rows whose reply redundancy is over the default preset's
    tolerance (clean rows its redundancy term pushes down), mean over the runs that hold clean rows of it."""
    scoring = load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"]
    shares: dict[str, list[float]] = {}
    for terms in runs.values():
        dataset, defect = np.asarray(terms["dataset"]), np.asarray(terms["defect"], dtype=object)
        over = np.asarray(terms["reply_redundancy"], dtype=float) > scoring["redundancy_tolerance"]
        for name in sorted(set(dataset)):
            clean = (dataset == name) & (defect == "")
            if clean.any():  # a small corpus can leave a dataset no clean row
                shares.setdefault(name, []).append(float(over[clean].mean()))
    return {name: round(float(np.mean(values)), 3) for name, values in sorted(shares.items())}


def analyse(judged: dict[str, dict], recipes: dict) -> dict:
    runs = sorted(judged)
    scorers = list(next(iter(judged.values())))

    def mean(scorer: str, metric: str, among=runs) -> float:
        return float(np.nanmean([judged[run][scorer][metric] for run in among]))

    def worst_kind(scorer: str, kinds) -> float:
        return min(mean(scorer, kind) for kind in kinds)

    def choose(kinds) -> str:  # the best worst-kind AUROC over ``kinds``, ties to the higher mean
        return max(
            recipes, key=lambda r: (round(worst_kind(r, kinds), 4), np.mean([mean(r, k) for k in kinds]))
        )

    def choose_by_mean(kinds) -> str:  # the best mean AUROC over ``kinds``
        return max(recipes, key=lambda r: np.mean([mean(r, k) for k in kinds]))

    # issue 19 item 9: a default never loses to perplexity overall nor within any dataset, for either base
    bases = sorted({run.rsplit("/", 2)[0] for run in runs})  # size/base: both regimes, every seed
    datasets = sorted({m.split("/")[1] for run in runs for m in judged[run][PERPLEXITY] if m.count("/") == 1})

    def level_with_perplexity(scorer: str, without: str | None = None) -> bool:
        """Planted-kind AUROC and every within-dataset AUROC not below perplexity's, in each size/base:
        below means the mean paired difference over its seeds (each seed's regimes averaged: a recipe
        without gate terms scores both regimes' rows alike, so they are one draw, not two) is under minus
        two standard errors (under zero with one seed); ``without``: the planted kinds but that one."""
        tail = f"/without/{without}" if without else ""
        metrics = [f"planted{tail}" if without else "planted", *(f"dataset/{d}{tail}" for d in datasets)]
        for base in bases:
            among = [run for run in runs if run.startswith(base + "/")]
            for metric in metrics:
                # a dataset left with no defect of the kinds judged (small corpora) has no AUROC there
                nan = float("nan")
                diff = by_seed(
                    {
                        r: judged[r][scorer].get(metric, nan) - judged[r][PERPLEXITY].get(metric, nan)
                        for r in among
                    }
                )
                error = paired_standard_error(diff)
                if len(diff) and diff.mean() < -2 * (error or 0.0):
                    return False
        return True

    def choose_level(kinds, without: str | None = None) -> str | None:  # ``choose`` among those level
        level = [r for r in recipes if level_with_perplexity(r, without)]
        return max(
            level,
            key=lambda r: (round(worst_kind(r, kinds), 4), np.mean([mean(r, k) for k in kinds])),
            default=None,
        )

    default_scoring = load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"]
    default = formula(
        (
            default_scoring.get("gate_weight", 1.0),
            default_scoring.get("perplexity_weight", 0.0),
            default_scoring.get("prompt_gain_weight", 0.0),
            default_scoring.get("expert_effect_weight", 0.0),
            default_scoring.get("driving_force_weight", 0.0),
            default_scoring.get("combine", "raw"),
            default_scoring.get("prompt_gain_cap", "none"),
            default_scoring.get("redundancy_weight", 0.0),
            default_scoring.get("redundancy_tolerance", 0.0),
        )
    )
    gates = formula((1.0, 0.0, 0.0, 0.0, 0.0, "robust_z", "none", 0.0, 0.0))
    loko = []
    for kind in BENCH_KINDS:
        chosen = choose([k for k in BENCH_KINDS if k != kind])
        by_mean = choose_by_mean([k for k in BENCH_KINDS if k != kind])
        level = choose_level([k for k in BENCH_KINDS if k != kind], without=kind)
        loko.append(
            {
                "held_out_kind": kind,
                "chosen_without_it": chosen,
                "chosen": mean(chosen, kind),
                "chosen_by_mean_without_it": by_mean,
                "chosen_by_mean": mean(by_mean, kind),
                "chosen_level_without_it": level,
                "chosen_level": mean(level, kind) if level else float("nan"),
                "default": mean(default, kind),
                "perplexity": mean(PERPLEXITY, kind),
                "gates_alone": mean(gates, kind),
            }
        )
    chosen_all = choose(BENCH_KINDS)
    level_all = choose_level(BENCH_KINDS)
    named = {
        f"default preset ({PipelineConfig().preset}): {default}": default,
        f"chosen on every planted kind: {chosen_all}": chosen_all,
        **({f"chosen among those level with perplexity: {level_all}": level_all} if level_all else {}),
        f"gates alone: {gates}": gates,
        PERPLEXITY: PERPLEXITY,
        "random": "random",
    }
    for nll, gain in ((2.0, 1.0), (2.0, 0.5), (2.0, 0.25)):  # the z-sum's two terms with NLL weighted more
        recipe = formula((0.0, nll, gain, 0.0, 0.0, "robust_z", "none", 0.0, 0.0))
        if recipe in recipes:
            named[f"NLL weighted {nll / gain:g}x prompt gain: {recipe}"] = recipe
    nll_alone = formula((0.0, 1.0, 0.0, 0.0, 0.0, "robust_z", "none", 0.0, 0.0))
    named[f"NLL alone (stage 2's NLL): {nll_alone}"] = nll_alone
    for recipe in RAW_RECIPES:  # the default's own recipe is named once, as the default
        if formula(recipe) != default:
            named[f"in nats: {formula(recipe)}"] = formula(recipe)
    z_sum = formula(
        (0.0, 1.0, 1.0, 0.0, 0.0, "robust_z", "none", 0.0, 0.0)
    )  # the same two terms as robust z-scores
    if z_sum != default:
        named[f"as robust z-scores: {z_sum}"] = z_sum
    d2 = formula((0.0, 0.0, 0.0, 0.0, 1.0, "robust_z", "none", 0.0, 0.0))
    if d2 in recipes:
        named[f"driving force alone: {d2}"] = d2
    groups = sorted({run.rsplit("/", 1)[0] for run in runs})
    metrics = (
        "planted",
        "worst_planted_kind",
        "unseen",
        *UNSEEN_KINDS,
        "within_datasets",
        "worst_dataset",
        "precision_at_5pct",
    )
    by_group = []
    for group in ["all runs", *groups]:
        among = runs if group == "all runs" else [r for r in runs if r.startswith(group + "/")]
        for label, scorer in named.items():
            row = {"runs": group, "scorer": label}
            for metric in metrics:
                row[metric] = (
                    min(mean(scorer, k, among) for k in BENCH_KINDS)
                    if metric == "worst_planted_kind"
                    else mean(scorer, metric, among)
                )
            row["worst_dataset"] = min(judged[run][scorer]["worst_dataset"] for run in among)
            by_group.append(row)
    top = sorted(recipes, key=lambda r: -worst_kind(r, BENCH_KINDS))[:10]
    return {
        "default_recipe": default,
        "chosen_on_all_planted_kinds": chosen_all,
        "item_9": {
            "rule": "among the recipes level with perplexity (planted kinds and every dataset, per size/base: "
            "the mean paired difference over the seeds, each seed's regimes averaged, not under minus two "
            "standard errors), the best worst planted kind",
            "recipes_level_with_perplexity": sum(level_with_perplexity(r) for r in recipes),
            "chosen": level_all,
            "default_is_level": level_with_perplexity(default),
        },
        "leave_one_kind_out": loko,
        "loko_worst": {
            name: float(np.nanmin([row[name] for row in loko]))
            for name in ("chosen", "chosen_by_mean", "chosen_level", "default", "perplexity", "gates_alone")
        },
        "by_group": by_group,
        "top_recipes_by_worst_planted_kind": [
            {"recipe": r, "worst_planted_kind": worst_kind(r, BENCH_KINDS), "unseen": mean(r, "unseen")}
            for r in top
        ],
        "per_run": {  # the leave-one-kind-out metrics ("/without/") stay out: they only serve the choice
            run: {
                s: {m: v for m, v in judged[run][s].items() if "/without/" not in m} for s in named.values()
            }
            for run in runs
        },
        "named": named,
        "scorers": len(scorers),
    }


def check_on_demo(run: Path, named: dict[str, str], recipes: dict, args) -> list[dict]:
    """The named recipes (D2 left out: the demo does not score it) judged like every run on a demo run's
    rows stage 1 did not train on; perplexity under the demo's base selector."""
    stage1 = run / STAGE_DIRS["pretrain"]
    labels = {r["id"]: r for r in map(json.loads, (run / "data" / LABELS_FILE).open())}
    rows = [r for f in sorted((run / "data" / "train").glob("*.jsonl")) for r in map(json.loads, f.open())]
    selector = json.loads((stage1 / MANIFEST).read_text())["config"]["selector_model"]["path"]
    base_nll, _ = perplexity_nll(Path(selector), rows, args.max_length)
    terms = held_out_terms(run / STAGE_DIRS["select"] / SCORES_DIR, stage1 / TRAINING_IDS, labels, base_nll)
    judged = judge(
        terms,
        {r: recipes[r] for r in named.values() if r in recipes and recipes[r][D2_WEIGHT] == 0},
        args.percentage,
    )
    metrics = ("planted", *(k for k in BENCH_KINDS if (np.asarray(terms["defect"]) == k).any()), "within_datasets",
               "worst_dataset", "precision_at_5pct")  # fmt: skip
    return [
        {"scorer": label, **{m: judged[recipe][m] for m in metrics}}
        for label, recipe in named.items()
        if recipe in judged
    ]


MERGED_METRICS = ("planted", "unseen", "within_datasets", "worst_dataset", "precision_at_5pct")


def paired_standard_error(diff: np.ndarray) -> float | None:
    """The standard error of the mean of paired differences (one per pair); None with one pair."""
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None


def by_seed(per_run: dict[str, float]) -> np.ndarray:
    """Per-run values (run name ``.../seedN`` -> value) as one per seed, the mean of its runs (its stage-1
    regimes), NaN skipped: a recipe without gate terms scores both regimes' rows alike, so they are one draw
    of the corpus and base model, not two."""
    seeds: dict[str, list[float]] = {}
    for run, value in per_run.items():
        if not np.isnan(value):
            seeds.setdefault(run.rsplit("/", 1)[1], []).append(value)
    return np.array([np.mean(values) for values in seeds.values()])


def merge_results(paths: list[Path]) -> dict:
    """The ``per_run`` rows of several results files as one set of runs: per size/base (both regimes,
    every seed), each recipe's mean of ``MERGED_METRICS`` and its paired difference from perplexity (mean,
    standard error over the seeds, each seed's regimes averaged, runs not below). Recipes are those every
    run judged; a run in two files is an error."""
    per_run: dict[str, dict] = {}
    for path in paths:
        for run, scorers in json.loads(path.read_text())["per_run"].items():
            if run in per_run:
                raise SystemExit(f"{path}: run {run} is in an earlier --merge file too")
            per_run[run] = scorers
    runs = sorted(per_run)
    recipes = [r for r in per_run[runs[0]] if all(r in per_run[run] for run in runs)]
    rows = []
    for group in sorted({run.rsplit("/", 2)[0] for run in runs}):
        among = [run for run in runs if run.startswith(group + "/")]
        for recipe in recipes:
            row = {"runs": group, "n_runs": len(among), "scorer": recipe}
            for metric in MERGED_METRICS:
                values = np.array([per_run[run][recipe][metric] for run in among], dtype=float)
                row[metric] = float(np.nanmean(values))
                if recipe != PERPLEXITY:
                    diff = values - np.array([per_run[run][PERPLEXITY][metric] for run in among], dtype=float)
                    row[f"{metric} vs perplexity"] = {
                        "mean": float(np.nanmean(diff)),
                        "standard_error": paired_standard_error(by_seed(dict(zip(among, diff)))),
                        "runs_not_below": int((diff[~np.isnan(diff)] >= 0).sum()),
                    }
            rows.append(row)
    return {"merged": [str(path) for path in paths], "merged_runs": runs, "by_size_base": rows}


def print_merged(results: dict) -> None:
    def paired(row: dict, metric: str) -> str:
        d = row.get(f"{metric} vs perplexity")
        if d is None:
            return ""
        se = "" if d["standard_error"] is None else f" ({d['standard_error']:.3f})"
        return f"{d['mean']:+.3f}{se}, {d['runs_not_below']}/{row['n_runs']}"

    paired_metrics = ("planted", "within_datasets", "worst_dataset")
    print_table(
        f"{len(results['merged_runs'])} runs of {len(results['merged'])} files, per size/base (mean over its "
        "runs; vs perplexity: mean paired difference (standard error), runs not below)",
        [
            "runs",
            "n",
            "scorer",
            *(h for m in paired_metrics for h in (m, "vs perplexity")),
            "unseen",
            "precision_at_5pct",
        ],
        [
            [
                r["runs"],
                r["n_runs"],
                r["scorer"],
                *(c for m in paired_metrics for c in (r[m], paired(r, m))),
                r["unseen"],
                r["precision_at_5pct"],
            ]
            for r in results["by_size_base"]
        ],
    )


def print_results(results: dict, n_runs: int) -> None:
    loko = results["leave_one_kind_out"]
    print_table(
        f"Leave one planted kind out ({n_runs} runs): the recipe chosen on the other kinds, judged on the held-out one",
        [
            "held-out kind",
            "best worst kind without it",
            "its AUROC",
            "best mean without it",
            "its AUROC",
            "best worst kind level with perplexity without it",
            "its AUROC",
            "default",
            "perplexity",
            "gates alone",
        ],  # fmt: skip
        [
            [
                r["held_out_kind"],
                r["chosen_without_it"],
                r["chosen"],
                r["chosen_by_mean_without_it"],
                r["chosen_by_mean"],
                r["chosen_level_without_it"],
                r["chosen_level"],
                r["default"],
                r["perplexity"],
                r["gates_alone"],
            ]
            for r in loko
        ],
    )
    worst = results["loko_worst"]
    print(
        f"worst held-out kind: chosen by worst kind {worst['chosen']:.3f}, by mean {worst['chosen_by_mean']:.3f}, "
        f"by worst kind among those level with perplexity {worst['chosen_level']:.3f}, "
        f"default {worst['default']:.3f}, "
        f"perplexity {worst['perplexity']:.3f}, gates alone {worst['gates_alone']:.3f}"
    )
    if "held_out_corpus" in results:
        rows = results["held_out_corpus"]
        columns = [c for c in rows[0] if c != "scorer"]
        print_table(
            "On the demo's corpus (held out: generated rows, no weight chosen on them)",
            ["scorer", *columns],
            [[r["scorer"], *[r[c] for c in columns]] for r in rows],
        )
    item_9 = results["item_9"]
    print(
        f"level with perplexity (planted kinds and every dataset, per size/base): "
        f"{item_9['recipes_level_with_perplexity']} recipes; the best worst kind among them: {item_9['chosen']}; "
        f"the default is {'' if item_9['default_is_level'] else 'not '}level"
    )
    over = ", ".join(
        f"{name} {share:.2f}" for name, share in results["clean_over_redundancy_tolerance"].items()
    )
    print(f"clean rows over the default's redundancy tolerance, per dataset: {over}")
    rows = results["by_group"]
    columns = [c for c in rows[0] if c not in ("runs", "scorer")]
    print_table(
        "Per base / regime (mean over seeds; worst_dataset: the lowest over every run)",
        ["runs", "scorer", *columns],
        [[r["runs"], r["scorer"], *[r[c] for c in columns]] for r in rows],
    )


if __name__ == "__main__":
    sys.exit(main())

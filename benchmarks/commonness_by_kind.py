"""Which rows does the reply commonness flag? Model-free, per source dataset and defect kind.

``scoring.commonness_weight`` penalises the share of a reply's token 8-grams that many rows' replies share
(``selectmoe.select.score.reply_commonness``). It needs no model, so this measures it on whole corpora in
seconds, through the product's chat template and functions, on two corpora:

- ``real``: ``--real-rows`` real rows from ``../shared/data/train`` (the 32k tokenizer the tiny selectors
  use), ``--defect-rate`` of them spoiled by ``--kinds`` in equal numbers (default: every kind but
  ``wrong_answer``, which needs an answer generator);
- ``demo``: the demo's generated corpus (``make demo``'s, every planted kind, its own BPE tokenizer),
  whose clean replies come from templates.

Per corpus, dataset and kind: rows, mean commonness and the share of rows above ``--tolerance``, and per
kind the AUROC of ``-commonness`` for telling clean rows from that kind's within each dataset (clean
positive, macro mean over datasets: 0.5 is blind, below 0.5 the term ranks that kind above clean rows).

    python benchmarks/commonness_by_kind.py --json benchmarks/results/commonness_by_kind.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
from common import TRAIN_DIR, sample_rows, write_json

from selectmoe.config import ScoringSection
from selectmoe.data.template import encode_batch
from selectmoe.demo.defects import DEFECT_KINDS, HELD_OUT_KINDS, plant_defects
from selectmoe.metrics import auroc_within_groups
from selectmoe.select.score import common_ngrams, reply_commonness, reply_ngrams


def main() -> int:
    args = parse_args()
    report = {"args": vars(args), "corpora": {}}
    for seed in args.seeds:
        report["corpora"][f"real_seed{seed}"] = summarise(*real_corpus(args, seed), args)
    report["corpora"]["demo"] = summarise(*demo_corpus(args), args)
    for name, corpus in report["corpora"].items():
        print(f"\n{name}: {corpus['common_ngrams']} common 8-grams over {corpus['rows']} rows")
        for kind in ["clean", *corpus["auroc_within_datasets"]]:
            cells = ", ".join(
                f"{dataset} {cells[kind]['mean']:.2f}/{cells[kind]['above_tolerance']:.2f}"
                for dataset, cells in ((d, v["kinds"]) for d, v in corpus["by_dataset"].items())
                if kind in cells
            )
            value = corpus["auroc_within_datasets"].get(kind)
            label = f"AUROC {value:.3f}" if value is not None else " " * 11
            print(f"  {kind:12s} {label}  mean / share above {args.tolerance:g}: {cells}")
    write_json(args.json, report)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--real-rows", type=int, default=3000)
    p.add_argument("--demo-rows", type=int, default=8000)
    p.add_argument("--defect-rate", type=float, default=0.3)
    kinds = [k for k in DEFECT_KINDS + HELD_OUT_KINDS if k != "wrong_answer"]
    p.add_argument("--kinds", nargs="+", default=kinds, choices=kinds)
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--json", default=None)
    return p.parse_args()


def real_corpus(args, seed: int) -> tuple[list[dict], list[str], object]:
    from selectmoe.demo.tiny import build_tokenizer

    rows = sample_rows(TRAIN_DIR, args.real_rows, seed)
    labels = plant_defects(random.Random(seed + 1), rows, args.defect_rate, args.kinds)
    return rows, [label["defect"] or "clean" for label in labels], build_tokenizer()


def demo_corpus(args) -> tuple[list[dict], list[str], object]:
    import json

    from selectmoe.demo.corpus import LABELS_FILE, write_demo_corpus
    from selectmoe.demo.run import demo_lm_rows

    with tempfile.TemporaryDirectory() as tmp:
        out = write_demo_corpus(Path(tmp) / "corpus", seed=0, n_rows=args.demo_rows)
        rows = [json.loads(line) for f in sorted((out / "train").glob("*.jsonl")) for line in f.open()]
        kind = {
            (label := json.loads(line))["id"]: label["defect"] or "clean"
            for line in (out / LABELS_FILE).open()
        }
        _, tokenizer = demo_lm_rows(Path(tmp) / "lm", seed=0)
    return rows, [kind[r["id"]] for r in rows], tokenizer


def summarise(rows: list[dict], kinds: list[str], tokenizer, args) -> dict:
    """The rows the chat template accepts (as stage 2 scores them; the rest are left out)."""
    tolerance = args.tolerance
    encoded = encode_batch([r["messages"] for r in rows], tokenizer, max_seq_length=args.max_length)
    accepted = [i for i, e in enumerate(encoded) if isinstance(e, dict)]
    ngrams = np.stack([reply_ngrams(encoded[i]["input_ids"], encoded[i]["labels"]) for i in accepted])
    common = common_ngrams(ngrams, ScoringSection().common_ngram_share)
    commonness = reply_commonness(ngrams, common)
    datasets = np.array([rows[i]["dataset"] for i in accepted])
    kinds = np.array([kinds[i] for i in accepted])
    rows = [rows[i] for i in accepted]
    by_dataset = {}
    for dataset in sorted(set(datasets)):
        here = datasets == dataset
        cells = {}
        for kind in sorted(set(kinds[here])):
            values = commonness[here & (kinds == kind)]
            cells[kind] = {
                "mean": float(values.mean()),
                "above_tolerance": float((values > tolerance).mean()),
            }
        by_dataset[dataset] = {"rows": int(here.sum()), "kinds": cells}
    aurocs = {}
    for kind in sorted(set(kinds.tolist()) - {"clean"}):
        pair = (kinds == "clean") | (kinds == kind)
        within = auroc_within_groups(-commonness[pair], kinds[pair] == "clean", datasets[pair])
        aurocs[kind] = float(np.mean(list(within.values())))
    return {
        "rows": len(rows),
        "common_ngrams": int(len(common)),
        "by_dataset": by_dataset,
        "auroc_within_datasets": aurocs,
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""How long must a tiny selector be LM-pretrained before its held-out loss plateaus?

Two corpora:

- ``--corpus demo``: the demo's recipe (``selectmoe.demo.run.demo_models``: 2000 generated clean rows and
  the tokenizer trained on them, batch 8, the peak lr of its ``LM_LEARNING_RATES`` (``--lr``) with
  linear decay, length 128), held out: 200 generated rows of another seed.
  ``demo.lm_steps`` is chosen from this table.
- ``--corpus real``: ``loko.py``'s bases (its ``--sizes``; the same LM rows of ``../shared/data/train``
  for the seed, length 256, cached where ``loko.py`` finds them), held out: the seed's corpus rows
  before any defect is planted. Issue 19 item 7 compares sizes each pretrained to its plateau;
  ``--lm-rows`` LM-pretrains on that many other rows (``loko.py --lm-rows``).

Per length: the held-out LM loss (every token) and the training loss over the last tenth of the steps,
and the shortest length within 2% of the lowest held-out loss (a plateau, if the lengths reach one;
longer runs overfit a small corpus, and the held-out loss rises again).

    .venv/bin/python benchmarks/lm_plateau.py --json benchmarks/results/demo_lm_plateau_lr1e-2.json  # ~10 min
    .venv/bin/python benchmarks/lm_plateau.py --corpus real --size medium --steps 300 600 900 1200 \\
        --json benchmarks/results/lm_plateau_medium.json
    .venv/bin/python benchmarks/lm_plateau.py --corpus real --size medium --lm-rows 12000 --steps 1500  # loko's base
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TRAIN_DIR, lm_pretrained_tiny, print_table, quiet_transformers, write_json
from loko import SIZES, lm_and_corpus_rows

from selectmoe.data.collate import collate
from selectmoe.data.template import encode_batch, ensure_pad_token, load_tokenizer
from selectmoe.demo.corpus import write_demo_corpus
from selectmoe.demo.run import LM_LEARNING_RATES, demo_lm_rows
from selectmoe.demo.tiny import build_tiny_olmoe, final_lm_loss, pretrain_tiny_lm

DEMO_LENGTH, REAL_LENGTH = 128, 256  # the demo's pretraining length; loko.py's --max-length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=("demo", "real"), default="demo")
    p.add_argument("--size", choices=list(SIZES), default="small", help="with --corpus real")
    p.add_argument("--rows", type=int, default=1500, help="with --corpus real: loko.py's --rows")
    p.add_argument("--lm-rows", type=int, default=None, help="with --corpus real: loko.py's --lm-rows")
    p.add_argument(
        "--tokenizer-vocab", type=int, default=None, help="with --corpus real: loko.py's --tokenizer-vocab"
    )
    p.add_argument("--data-dir", default=str(TRAIN_DIR))
    p.add_argument("--work-dir", default="/tmp/selectmoe_loko", help="with --corpus real: loko.py's cache")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lr",
        type=float,
        default=LM_LEARNING_RATES["selector_olmoe"],
        help="with --corpus demo: the peak learning rate (default: the demo's)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.corpus == "demo":
            lm_rows, tokenizer = demo_lm_rows(work / "lm", args.seed)
            held_out = chat_rows(
                write_demo_corpus(work / "held", seed=args.seed + 3000, n_rows=200, defect_rate=0.0)
            )
            base = build_tiny_olmoe(work / "init", seed=args.seed, tokenizer=tokenizer)

            def pretrained(steps: int) -> Path:
                return pretrain_tiny_lm(
                    base, lm_rows, work / f"lm{steps}", steps=steps, seed=args.seed, learning_rate=args.lr
                )

            length, what = DEMO_LENGTH, "200 generated rows of another seed"
        else:
            lm_rows, corpus_rows = lm_and_corpus_rows(Path(args.data_dir), args.rows, args.lm_rows, args.seed)
            held_out = [r["messages"] for r in corpus_rows]

            def pretrained(steps: int) -> Path:
                cache = Path(args.work_dir) / "models"
                return lm_pretrained_tiny(
                    "olmoe",
                    args.seed,
                    lm_rows,
                    steps,
                    REAL_LENGTH,
                    cache,
                    args.tokenizer_vocab,
                    **SIZES[args.size],
                )

            what = f"the {len(held_out)} corpus rows of loko.py's seed {args.seed}; {len(lm_rows)} LM rows"
            length = REAL_LENGTH
        results = []
        for steps in args.steps:
            started = time.time()
            out = pretrained(steps)
            results.append(
                {
                    "steps": steps,
                    "train_loss_last_tenth": final_lm_loss(out)[1],
                    "held_out_loss": held_out_loss(out, held_out, length),
                    "seconds": round(time.time() - started, 1),
                }
            )
    lowest = min(r["held_out_loss"] for r in results)  # not the longest's: a small corpus is overfitted
    plateau = next(r["steps"] for r in results if r["held_out_loss"] <= 1.02 * lowest)
    name = "the demo selector" if args.corpus == "demo" else f"loko.py's {args.size} selector"
    print_table(
        f"LM pretraining of {name} (held-out: {what})",
        ["steps", "train loss (last tenth)", "held-out loss", "seconds"],
        [[r["steps"], r["train_loss_last_tenth"], r["held_out_loss"], r["seconds"]] for r in results],
    )
    print(f"\nshortest length within 2% of the lowest held-out loss: {plateau} steps")
    write_json(
        args.json,
        {
            "args": vars(args),
            "lm_rows": len(lm_rows),
            "held_out_rows": len(held_out),
            "results": results,
            "plateau_steps": plateau,
        },
    )


def chat_rows(corpus: Path) -> list[list[dict]]:
    return [
        json.loads(line)["messages"] for f in sorted((corpus / "train").glob("*.jsonl")) for line in f.open()
    ]


@torch.inference_mode()
def held_out_loss(model_dir: Path, rows: list[list[dict]], max_length: int) -> float:
    """Mean token loss over every token of the rows (the loss pretrain_tiny_lm trains)."""
    from transformers import AutoModelForCausalLM

    tokenizer = ensure_pad_token(load_tokenizer(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    encoded = [
        e
        for e in encode_batch(rows, tokenizer, max_seq_length=max_length, loss_on="all")
        if isinstance(e, dict)
    ]
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), 16):
        batch = collate(encoded[start : start + 16], tokenizer.pad_token_id, torch.device("cpu"))
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    return total / tokens


if __name__ == "__main__":
    sys.exit(main())

"""How long must the demo's tiny selector be LM-pretrained before its loss plateaus?

The demo's recipe (``selectmoe.demo.run.demo_models``: 2000 generated clean rows, batch 8, lr 3e-3 with
linear decay) at several lengths; per length the held-out LM loss (200 generated rows of another seed)
and the training loss over the last tenth of the steps, and the shortest length within 2% of the longest
one's held-out loss (a plateau, if the lengths reach one). ``demo.lm_steps`` is chosen from this table.

    .venv/bin/python benchmarks/demo_lm_plateau.py --json benchmarks/results/demo_lm_plateau.json  # ~10 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, quiet_transformers, write_json

from selectmoe.data.collate import collate
from selectmoe.data.template import encode_batch, ensure_pad_token, load_tokenizer
from selectmoe.demo.corpus import write_demo_corpus
from selectmoe.demo.tiny import build_tiny_olmoe, final_lm_loss, pretrain_tiny_lm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = chat_rows(write_demo_corpus(work / "lm", seed=args.seed + 1000, n_rows=2000, defect_rate=0.0))
        held_out = chat_rows(
            write_demo_corpus(work / "held", seed=args.seed + 3000, n_rows=200, defect_rate=0.0)
        )
        base = build_tiny_olmoe(work / "init", seed=args.seed)
        results = []
        for steps in args.steps:
            started = time.time()
            out = pretrain_tiny_lm(base, rows, work / f"lm{steps}", steps=steps, seed=args.seed)
            results.append(
                {
                    "steps": steps,
                    "train_loss_last_tenth": final_lm_loss(out)[1],
                    "held_out_loss": held_out_loss(out, held_out),
                    "seconds": round(time.time() - started, 1),
                }
            )
    longest = results[-1]["held_out_loss"]
    plateau = next(r["steps"] for r in results if r["held_out_loss"] <= 1.02 * longest)
    print_table(
        "The demo selector's LM pretraining (held-out: 200 generated rows of another seed)",
        ["steps", "train loss (last tenth)", "held-out loss", "seconds"],
        [[r["steps"], r["train_loss_last_tenth"], r["held_out_loss"], r["seconds"]] for r in results],
    )
    print(f"\nshortest length within 2% of the longest's held-out loss: {plateau} steps")
    write_json(args.json, {"args": vars(args), "results": results, "plateau_steps": plateau})


def chat_rows(corpus: Path) -> list[list[dict]]:
    return [
        json.loads(line)["messages"] for f in sorted((corpus / "train").glob("*.jsonl")) for line in f.open()
    ]


@torch.inference_mode()
def held_out_loss(model_dir: Path, rows: list[list[dict]]) -> float:
    """Mean token loss over every token of the rows (the loss pretrain_tiny_lm trains)."""
    from transformers import AutoModelForCausalLM

    tokenizer = ensure_pad_token(load_tokenizer(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    encoded = [
        e for e in encode_batch(rows, tokenizer, max_seq_length=128, loss_on="all") if isinstance(e, dict)
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

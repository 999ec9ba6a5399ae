"""How often the reply redundancy flags clean replies, and how often it catches restated ones: no model.

The default's redundancy term (``scoring.redundancy_weight`` 8 beyond ``redundancy_tolerance`` 0.4) is the
product's ``reply_redundancy``: the larger of the reply's repeats of itself (a loop) and the share of the
request's 4-grams the reply repeats (a restated request), the request's n-grams counting the chat template's
role headers. Inside TyDi QA a clean answer that copies most of a short passage repeats over 40% of them and
is flagged. A mend designed on 2026-12-07 (not built): count only the request's content 4-grams (no role
header) and call a reply a restatement only when it repeats nearly all of them, loops keeping 0.4. This
measures the trade on any corpus folder (``eval_corpus.py``'s sets, ``../shared/data/train``), per source
dataset, with the benchmarks' 32k tokenizer and the rows cut to ``--max-length`` as stage 2 cuts them:

- ``clean``: the share of clean replies flagged (a false alarm: the row loses score);
- ``echo``, ``restated``, ``looped``, ``doubled``: the same rows' replies spoiled by the product's
  ``spoil`` (the request itself; "You asked: ..." and the reply's first sentence; the reply's opening
  repeated; the reply twice), and the share of them flagged.

Each for the product's redundancy over its tolerance (``product``) and for the content-only restatement
share at or over each ``--thresholds`` (``content_T``, loops over 0.4 as before).

    .venv/bin/python benchmarks/redundancy_rates.py /tmp/selectmoe_eval_corpus /tmp/selectmoe_eval_unseen \\
        /tmp/selectmoe_eval_third ../shared/data/train --json benchmarks/results/redundancy_rates.json
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from common import print_table, write_json
from selection_quality import sample_by_file

from selectmoe.config import PipelineConfig, load_preset
from selectmoe.data.rejects import RowError
from selectmoe.data.template import IGNORE_INDEX, encode_batch, message_spans
from selectmoe.demo.defects import request_of, spoil
from selectmoe.demo.tiny import build_tokenizer
from selectmoe.select.score import REDUNDANCY_NGRAM, reply_redundancy

KINDS = ("clean", "echo", "restated", "looped", "doubled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="corpus folders of JSON lines files")
    p.add_argument(
        "--rows",
        type=int,
        default=400,
        help="rows per file (a seeded sample; the train folder's by its shares)",
    )
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    tokenizer = build_tokenizer()
    tolerance = load_preset(PipelineConfig().preset)["keys"]["select"]["scoring"]["redundancy_tolerance"]
    results = {}
    for folder in args.folders:
        rates = folder_rates(folder, tokenizer, args, tolerance)
        results[str(folder)] = rates
        rows = [
            [dataset, kind, r["rows"], r["product"], *(r[f"content_{t:g}"] for t in args.thresholds)]
            for dataset, kinds in rates.items()
            for kind, r in kinds.items()
        ]
        print_table(
            f"{folder}: share flagged",
            [
                "dataset",
                "reply",
                "rows",
                f"product (> {tolerance:g})",
                *(f"content >= {t:g}" for t in args.thresholds),
            ],
            rows,
        )
    write_json(args.json, {"args": vars(args), "tolerance": tolerance, "folders": results})


def folder_rates(folder: Path, tokenizer, args, tolerance: float) -> dict[str, dict[str, dict]]:
    """dataset -> kind -> rows judged and the share flagged by each rule."""
    flagged: dict[str, dict[str, list]] = {}
    for row in sample_by_file(folder, args.rows * len(list(folder.glob("*.jsonl"))), args.seed):
        reply = row["messages"][-1]["content"]
        for kind in KINDS:
            rng = random.Random(f"{args.seed}/{row['id']}/{kind}")
            spoiled = reply if kind == "clean" else spoil(kind, reply, rng, donor="", request=request_of(row))
            tokens = encode(
                row["messages"][:-1] + [{"role": "assistant", "content": spoiled}], tokenizer, args
            )
            if tokens is None:  # the reply cut away: stage 2 rejects the row
                continue
            ids, in_reply, in_content = tokens
            labels = np.where(in_reply, ids, IGNORE_INDEX)
            loop, restated = content_shares(ids, in_reply, in_content)
            flags = {"product": reply_redundancy(ids, labels) > tolerance}
            flags.update({f"content_{t:g}": loop > tolerance or restated >= t for t in args.thresholds})
            flagged.setdefault(row["dataset"], {}).setdefault(kind, []).append(flags)
    return {
        dataset: {
            kind: {"rows": len(f), **{rule: float(np.mean([x[rule] for x in f])) for rule in f[0]}}
            for kind, f in kinds.items()
        }
        for dataset, kinds in sorted(flagged.items())
    }


def encode(messages: list[dict], tokenizer, args) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The product's encoding of the row (``encode_batch``, cut to ``--max-length``): its token ids, which
    are the reply's, and which lie in the content of another message (no role header); None when stage 2
    would reject the row (no reply token left)."""
    (encoded,) = encode_batch([messages], tokenizer, max_seq_length=args.max_length)
    if isinstance(encoded, RowError):
        return None
    ids = encoded["input_ids"]
    text, spans = message_spans(messages, tokenizer.eos_token)
    starts = np.asarray(
        [start for start, _ in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
    )
    starts = starts[: len(ids)]
    in_content = np.zeros(len(ids), bool)
    for message, (start, end) in zip(messages, spans):
        if message["role"] != "assistant":
            in_content |= (starts >= start) & (starts < end)
    return ids, encoded["labels"] != IGNORE_INDEX, in_content


def content_shares(ids: np.ndarray, in_reply: np.ndarray, in_content: np.ndarray) -> tuple[float, float]:
    """(the share of the reply's 4-grams already earlier in it, the share of the request's content 4-grams
    the reply repeats); the first is the product's loop share."""
    n, reply, request = REDUNDANCY_NGRAM, set(), set()
    repeated = total = 0
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1 : end + 1].tolist())
        if in_reply[end]:
            total += 1
            repeated += gram in reply
            reply.add(gram)
        elif in_content[end - n + 1 : end + 1].all():
            request.add(gram)
    if not total:
        return 0.0, 0.0
    return repeated / total, len(request & reply) / len(request) if request else 0.0


if __name__ == "__main__":
    main()

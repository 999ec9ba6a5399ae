"""Does the prompt gain of a reply's weakest span find fluent junk that its mean misses?

Stage 2 stores a row's prompt gain as a mean over its reply tokens: the NLL of the reply without its prompt
minus with it (``scoring.prompt_gain``). A paragraph that has nothing to do with the request (a quote of
another row, a further task, a disclaimer) gains nothing from the prompt, but in a long reply its tokens
are averaged with the rest. This measures, on real rows with planted defects, whether aggregations of the
per-token gain that look at the reply's weakest part tell clean rows from each kind better than the mean:
its lower quantiles and the lowest mean over a window of ``--windows`` tokens. A window's minimum falls
as a reply grows (more windows to take it from), and most fluent kinds add text, so each aggregation of the
gain is also given with the reply's log length regressed out over the corpus (no labels), and the length
itself (``-length``: shorter ranks higher) is shown as the confound to beat.

Per seed and base: ``--rows`` rows of ``../shared/data/train`` (the selection benchmarks' file shares)
spoiled at ``--defect-rate`` by ``--kinds`` in equal numbers, a tiny OLMoE LM-pretrained ``--lm-steps``
steps on as many other rows (the default preset measures its NLL terms with the base model, so no stage
1 runs), the per-token NLLs through the product's chat template and its unprompted reply encoding
(``encode_replies_alone``), rows cut at ``--max-length`` tokens (256, as the other selection benchmarks:
text a kind adds at the end of a long row can fall past the cut), and per aggregation and kind the AUROC
of clean rows against that kind's within each source dataset, macro mean (0.5 is blind). The two sides'
tokens are paired in order from the reply's first; where the unprompted encoding differs by a token at a
turn boundary, the longer side is cut, so the mean gain here equals the product's where the two sides
have as many tokens.

    python benchmarks/prompt_gain_spans.py --json benchmarks/results/prompt_gain_spans.json
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from common import TRAIN_DIR, base_lm_and_replies, lm_pretrained_tiny, quiet_transformers, write_json
from selection_quality import sample_by_file

from selectmoe.data.collate import collate
from selectmoe.demo.defects import DEFECT_KINDS, HELD_OUT_KINDS, plant_defects
from selectmoe.metrics import auroc_within_groups
from selectmoe.select.score import score_mask

# the kinds no term or weight of the default was chosen on (from boilerplate on designed blind to every score)
LATER_KINDS = HELD_OUT_KINDS[HELD_OUT_KINDS.index("restated") :]


def main() -> int:
    args = parse_args()
    quiet_transformers()
    runs = {}
    for lm_steps in args.lm_steps:
        for seed in args.seeds:
            runs[f"lm{lm_steps}/seed{seed}"] = run(args, lm_steps, seed)
            print(f"lm{lm_steps}/seed{seed}: done", flush=True)
    summary = summarise(runs, args)
    for lm_steps, table in summary.items():
        kinds = list(next(iter(table.values())))
        print(f"\nbase LM-pretrained {lm_steps} steps; AUROC within datasets, mean over seeds {args.seeds}")
        print(
            f"{'aggregation':24s}"
            + "".join(f"{kind.replace('later kinds ', 'later ')[:10]:>11s}" for kind in kinds)
        )
        for name, cells in table.items():
            print(f"{name:24s}" + "".join(f"{cells[kind]:11.3f}" for kind in kinds))
    write_json(args.json, {"args": vars(args), "runs": runs, "summary": summary})
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(TRAIN_DIR))
    p.add_argument("--work-dir", default="/tmp/selectmoe_prompt_gain_spans", help="the base LMs' cache")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lm-steps", type=int, nargs="+", default=[30, 300], help="a weak and a strong base")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--defect-rate", type=float, default=0.5)
    p.add_argument(
        "--kinds", nargs="+", default=[k for k in DEFECT_KINDS + HELD_OUT_KINDS if k != "wrong_answer"]
    )
    p.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--json", default=None)
    return p.parse_args()


def run(args, lm_steps: int, seed: int) -> dict:
    """Per aggregation, per kind: the AUROC within datasets on one seed's corpus and base."""
    sampled = sample_by_file(Path(args.data_dir), 2 * args.rows, seed)
    lm_rows, corpus = sampled[::2], sampled[1::2]
    labels = plant_defects(random.Random(seed), corpus, args.defect_rate, args.kinds)
    model_dir = lm_pretrained_tiny("olmoe", seed, lm_rows, lm_steps, args.max_length, Path(args.work_dir))
    prompted, alone, scored = token_nlls(model_dir, corpus, args.max_length)
    features = aggregations([prompted[i] for i in scored], [alone[i] for i in scored], args.windows)
    kinds = np.array([labels[i]["defect"] or "clean" for i in scored])
    datasets = np.array([labels[i]["dataset"] for i in scored])
    table = {}
    for name, values in features.items():
        table[name] = {}
        for kind in args.kinds:
            pair = (kinds == "clean") | (kinds == kind)
            within = auroc_within_groups(values[pair], kinds[pair] == "clean", datasets[pair])
            table[name][kind] = float(np.mean(list(within.values())))
    return {
        "rows": len(scored),
        "kind_rows": {k: int((kinds == k).sum()) for k in args.kinds},
        "auroc": table,
    }


@torch.inference_mode()
def token_nlls(model_dir: Path, rows: list[dict], max_length: int) -> tuple[dict, dict, list[int]]:
    """Row index -> the per-token NLLs of its reply tokens with the prompt and without it (the unprompted
    encoding can differ by a token at a turn boundary), and the indices of the rows scored on both sides
    (the chat template accepts them and each side has a reply token)."""
    model, tokenizer, accepted = base_lm_and_replies(model_dir, rows, max_length)
    indices = [i for i, _, _ in accepted]
    full = [{"input_ids": e["input_ids"], "labels": e["labels"]} for _, e, _ in accepted]
    prompted = dict(zip(indices, per_token_nll(model, full, tokenizer.pad_token_id)))
    alone = dict(
        zip(indices, per_token_nll(model, [reply for _, _, reply in accepted], tokenizer.pad_token_id))
    )
    scored = [i for i in indices if min(len(prompted[i]), len(alone[i])) > 0]
    return prompted, alone, scored


def per_token_nll(model, items: list[dict], pad_token_id: int, batch_size: int = 16) -> list[np.ndarray]:
    """Each item's NLL of every assistant token, in order; only those positions go through the LM head."""
    out = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_token_id, torch.device("cpu"))
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        targets = score_mask(batch["attention_mask"], batch["labels"], "assistant")[:, 1:]
        for states, ids, mask in zip(hidden[:, :-1], batch["input_ids"][:, 1:], targets):
            logits = model.lm_head(states[mask]).float()
            out.append(torch.nn.functional.cross_entropy(logits, ids[mask], reduction="none").numpy())
    return out


def aggregations(
    prompted: list[np.ndarray], alone: list[np.ndarray], windows: list[int]
) -> dict[str, np.ndarray]:
    """Per row, higher is cleaner: the product's terms (-NLL, mean prompt gain), the gain's lower quantiles,
    its lowest window mean (the whole reply's mean where shorter), each of the gain's aggregations also
    with the log length regressed out over the corpus, and -length."""
    gains = [a[: min(len(p), len(a))] - p[: min(len(p), len(a))] for p, a in zip(prompted, alone)]
    length = np.array([len(g) for g in gains], dtype=np.float64)
    design = np.vstack([np.log(length), np.ones_like(length)]).T
    of_gain = {
        "prompt gain (product)": np.array([g.mean() for g in gains]),
        "gain q10": np.array([np.quantile(g, 0.1) for g in gains]),
        "gain q25": np.array([np.quantile(g, 0.25) for g in gains]),
    }
    for window in windows:
        of_gain[f"min {window}-token gain"] = np.array(
            [
                np.convolve(g, np.ones(window) / window, "valid").min() if len(g) >= window else g.mean()
                for g in gains
            ]
        )
    features = {"-NLL (product)": np.array([-p.mean() for p in prompted])}
    for name, values in of_gain.items():
        fit = np.linalg.lstsq(design, values, rcond=None)[0]
        features[name] = values
        features[f"{name.removesuffix(' (product)')}, length out"] = values - design @ fit
    features["-length"] = -length
    return features


def summarise(runs: dict, args) -> dict:
    """Per base: aggregation -> kind -> the AUROC's mean over seeds, with the mean over ``LATER_KINDS``."""
    summary = {}
    for lm_steps in args.lm_steps:
        tables = [r["auroc"] for name, r in runs.items() if name.startswith(f"lm{lm_steps}/")]
        summary[f"lm{lm_steps}"] = {
            name: {kind: float(np.mean([t[name][kind] for t in tables])) for kind in args.kinds}
            for name in tables[0]
        }
        for cells in summary[f"lm{lm_steps}"].values():
            later = [kind for kind in LATER_KINDS if kind in cells]
            cells["later kinds mean"] = float(np.mean([cells[kind] for kind in later]))
    return summary


if __name__ == "__main__":
    raise SystemExit(main())

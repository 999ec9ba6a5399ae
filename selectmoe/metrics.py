"""How well scores separate clean rows from bad ones: AUROC, precision at the selection size, tables.

Clean rows are the positives: a good scorer ranks them high. Used by the demo report and by
``benchmarks/selection_quality.py``, always next to baselines computed on the same rows (random,
perplexity under the same model, response length).
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of clean rows among the ``k`` best-scored rows."""
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")[:k]
    return float(np.asarray(positive, dtype=bool)[top].mean())


def separation_table(
    scorers: dict[str, np.ndarray], defect: np.ndarray, k: int
) -> tuple[list[str], list[dict[str, float | str]]]:
    """One row per scorer: AUROC overall and per defect kind (clean vs that kind), precision@k.

    ``defect`` holds the defect kind per row, or "" for a clean row."""
    defect = np.asarray(defect, dtype=object)
    clean = defect == ""
    kinds = sorted(set(defect[~clean]))
    columns = ["scorer", "auroc_all", *[f"auroc_{kind}" for kind in kinds], f"precision_at_{k}"]
    rows = []
    for name, scores in scorers.items():
        scores = np.asarray(scores, dtype=np.float64)
        row: dict[str, float | str] = {"scorer": name, "auroc_all": auroc(scores, clean)}
        for kind in kinds:
            keep = clean | (defect == kind)
            row[f"auroc_{kind}"] = auroc(scores[keep], clean[keep])
        row[f"precision_at_{k}"] = precision_at_k(scores, clean, k)
        rows.append(row)
    return columns, rows

"""How well scores separate clean rows from bad ones: AUROC, precision at the selection size, tables.

Clean rows are the positives: a good scorer ranks them high. Used by the demo report and by
``benchmarks/selection_quality.py``, always next to baselines computed on the same rows (random,
perplexity under the same model, response length).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_within_groups(scores: np.ndarray, positive: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUROC inside each group (a source dataset): a score can rank one dataset above another without
    telling good rows from bad ones inside either. Groups with one class only are left out."""
    scores, positive, groups = np.asarray(scores), np.asarray(positive, dtype=bool), np.asarray(groups)
    within = {str(g): auroc(scores[groups == g], positive[groups == g]) for g in sorted(set(groups.tolist()))}
    return {g: value for g, value in within.items() if not np.isnan(value)}


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of clean rows among the ``k`` best-scored rows."""
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")[:k]
    return float(np.asarray(positive, dtype=bool)[top].mean())


def separation_table(
    scorers: dict[str, np.ndarray], defect: np.ndarray, k: int, datasets: np.ndarray | None = None
) -> tuple[list[str], list[dict[str, float | str]]]:
    """One row per scorer: AUROC overall and per defect kind (clean vs that kind), precision@k, and with
    ``datasets`` (each row's source dataset) the macro mean of the AUROCs within each dataset and the
    lowest of them.

    ``defect`` holds the defect kind per row, or "" for a clean row."""
    defect = np.asarray(defect, dtype=object)
    clean = defect == ""
    kinds = sorted(set(defect[~clean]))
    columns = ["scorer", "auroc_all", *[f"auroc_{kind}" for kind in kinds], f"precision_at_{k}"]
    if datasets is not None:
        columns += ["auroc_within_datasets", "auroc_worst_dataset"]
    rows = []
    for name, scores in scorers.items():
        scores = np.asarray(scores, dtype=np.float64)
        row: dict[str, float | str] = {"scorer": name, "auroc_all": auroc(scores, clean)}
        for kind in kinds:
            keep = clean | (defect == kind)
            row[f"auroc_{kind}"] = auroc(scores[keep], clean[keep])
        row[f"precision_at_{k}"] = precision_at_k(scores, clean, k)
        if datasets is not None:
            within = auroc_within_groups(scores, clean, datasets)
            row["auroc_within_datasets"] = float(np.mean(list(within.values()))) if within else float("nan")
            row["auroc_worst_dataset"] = min(within.values(), default=float("nan"))
        rows.append(row)
    return columns, rows


def paired_auroc_difference(
    scores: np.ndarray,
    baseline: np.ndarray,
    positive: np.ndarray,
    groups: np.ndarray,
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``scores``' AUROC minus ``baseline``'s on the same rows, overall and as the mean within
    ``groups``, each with the standard error of a paired bootstrap (rows drawn with replacement,
    ``resamples`` times, seeded) and a verdict: ``above`` or ``below`` beyond two standard errors, else
    ``level`` (the rule ``benchmarks/loko.py`` applies over runs)."""
    scores, baseline = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    positive, groups = np.asarray(positive, dtype=bool), np.asarray(groups)

    def differences(rows: np.ndarray) -> tuple[float, float]:
        within = [auroc_within_groups(s[rows], positive[rows], groups[rows]) for s in (scores, baseline)]
        shared = sorted(set(within[0]) & set(within[1]))
        return (
            auroc(scores[rows], positive[rows]) - auroc(baseline[rows], positive[rows]),
            float(np.mean([within[0][g] - within[1][g] for g in shared])) if shared else float("nan"),
        )

    rng = np.random.default_rng(seed)
    observed = differences(np.arange(len(scores)))
    drawn = np.array([differences(rng.integers(0, len(scores), len(scores))) for _ in range(resamples)])
    out = {}
    for i, name in enumerate(("overall", "within_groups")):
        error = float(np.nanstd(drawn[:, i], ddof=1))
        verdict = "above" if observed[i] > 2 * error else "below" if observed[i] < -2 * error else "level"
        out[name] = {"difference": observed[i], "standard_error": error, "verdict": verdict}
    return out

"""What a trusted set (``selection.trusted``) decides in stage 2.

``selection.method=calibrated``: a logistic regression on the stored per-row features that tells
trusted rows from corpus rows. Its decision value is the row score, so the weights and the gates' sign
come from the trusted set, not from a benchmark. With any other score-ranked method and a gate term in
the formula (``scoring.gate_weight`` != 0), the trusted set sets that term's sign only (``gate_sign``):
the gates were inverted in every measured run, so their direction is checked, never assumed.

Features (those the score files hold): each layer's mean gate, the NLL, the prompt gain
(``nll_without_prompt - nll``), the expert effect (``nll_gates_shut - nll``), log(1 + scored
tokens) and the reply redundancy. They are standardised inside the fitted model, and the combiner is
stored as plain numbers (feature names, means, scales, coefficients, intercept), so any row's score
can be recomputed from its stored columns without scikit-learn.
"""

from __future__ import annotations

import numpy as np

from selectmoe.metrics import auroc
from selectmoe.select.score import score_terms

FEATURE_COLUMNS = (
    "layer_scores",
    "nll",
    "nll_without_prompt",
    "nll_gates_shut",
    "n_scored_tokens",
    "reply_redundancy",
)
CV_FOLDS = 5


def feature_matrix(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """(rows, features) and the feature names, from score-file columns (``FEATURE_COLUMNS`` present):
    the per-layer gates, ``score.score_terms`` but the mean gate, log(1 + scored tokens) and, where
    stored, the reply redundancy."""
    layers = np.asarray(columns["layer_scores"], dtype=np.float64)
    terms = score_terms(
        layers, columns.get("nll"), columns.get("nll_without_prompt"), columns.get("nll_gates_shut")
    )
    terms.pop("gate")
    terms["log_scored_tokens"] = np.log1p(np.asarray(columns["n_scored_tokens"], dtype=np.float64))
    if columns.get("reply_redundancy") is not None:
        terms["reply_redundancy"] = np.asarray(columns["reply_redundancy"], dtype=np.float64)
    names = [f"gate_layer_{i}" for i in range(layers.shape[1])] + list(terms)
    return np.column_stack([layers, *terms.values()]), names


def fit_combiner(trusted: np.ndarray, corpus: np.ndarray, names: list[str], seed: int) -> dict:
    """Class-balanced logistic regression, trusted = 1, corpus = 0, on standardised features; its
    cross-validated AUROC (stratified, seeded folds) and the model refitted on every row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([trusted, corpus])
    y = np.concatenate([np.ones(len(trusted)), np.zeros(len(corpus))])
    folds = min(CV_FOLDS, len(trusted), len(corpus))
    if folds < 2:
        raise ValueError(
            f"the combiner needs at least 2 trusted and 2 corpus rows (got {len(trusted)}, {len(corpus)})"
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    aurocs = cross_val_score(model, x, y, cv=cv, scoring="roc_auc")
    model.fit(x, y)
    scaler, regression = model[0], model[1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return {
        "features": names,
        "mean": scaler.mean_.tolist(),
        "scale": scale.tolist(),
        "coefficients": regression.coef_[0].tolist(),
        "intercept": float(regression.intercept_[0]),
        "cv_auroc": float(np.mean(aurocs)),
        "cv_auroc_folds": [float(a) for a in aurocs],
        "trusted_rows": int(len(trusted)),
        "corpus_rows": int(len(corpus)),
    }


def combiner_columns(combiner: dict) -> list[str]:
    """The score-file columns ``combiner_score`` reads for this combiner's features."""
    wanted = {
        "nll": "nll",
        "prompt_gain": "nll_without_prompt",
        "expert_effect": "nll_gates_shut",
        "reply_redundancy": "reply_redundancy",
    }
    return ["layer_scores", "n_scored_tokens"] + [c for f, c in wanted.items() if f in combiner["features"]]


def combiner_score(combiner: dict, columns: dict[str, np.ndarray]) -> np.ndarray:
    """The fitted combiner's decision value (log-odds of "trusted") of score-file rows."""
    x, names = feature_matrix(columns)
    if names != combiner["features"]:
        raise ValueError(f"the rows have features {names}; the combiner was fitted on {combiner['features']}")
    z = (x - np.asarray(combiner["mean"])) / np.asarray(combiner["scale"])
    return z @ np.asarray(combiner["coefficients"]) + combiner["intercept"]


def gate_direction(combiner: dict) -> str:
    """In words: whether the trusted set says higher gates mean better rows (the gates' summed
    standardised coefficient)."""
    gates = sum(c for f, c in zip(combiner["features"], combiner["coefficients"]) if f.startswith("gate_"))
    return (
        "positive: open gates mark trusted-like rows"
        if gates > 0
        else ("negative: the gates are inverted on this corpus (open gates mark rows unlike the trusted set)")
    )


def gate_sign(trusted_layers: np.ndarray, corpus_layers: np.ndarray, gate_weight: float) -> dict:
    """The gate term's weight as the trusted set orders it: ``|gate_weight|`` when the mean gate ranks
    trusted rows above corpus rows (AUROC >= 0.5, trusted positive), ``-|gate_weight|`` when below."""
    trusted = np.asarray(trusted_layers, dtype=np.float64).mean(axis=-1)
    corpus = np.asarray(corpus_layers, dtype=np.float64).mean(axis=-1)
    separation = auroc(
        np.concatenate([trusted, corpus]), np.concatenate([np.ones(len(trusted)), np.zeros(len(corpus))])
    )
    sign = 1.0 if separation >= 0.5 else -1.0
    return {
        "mean_gate_auroc": separation,
        "trusted_rows": int(len(trusted)),
        "corpus_rows": int(len(corpus)),
        "configured_gate_weight": gate_weight,
        "gate_weight": sign * abs(gate_weight),
        "direction": "positive: open gates mark trusted-like rows"
        if sign > 0
        else "inverted: open gates mark rows unlike the trusted set, so the gate term is subtracted",
    }

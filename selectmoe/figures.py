"""The figures a stage writes beside its outputs (matplotlib, headless): training curves (stages 1
and 3) and score histograms (stage 2). Run-level figures are drawn by ``selectmoe.reporting``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], path: str | Path, title: str) -> Path:
    """Losses per step, and (stage 1) the mean gate value per layer."""
    steps = [m["step"] for m in history]
    has_gates = bool(history) and "gate_mean" in history[0]
    fig, axes = plt.subplots(1, 2 if has_gates else 1, figsize=(11 if has_gates else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key in ("lm_loss", "quality_loss", "load_balancing_loss", "loss"):
        values = [m.get(key) for m in history]
        if any(v is not None for v in values):
            ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    if has_gates:
        ax = axes[0][1]
        for layer in range(len(history[0]["gate_mean"])):
            ax.plot(steps, [m["gate_mean"][layer] for m in history], label=f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean gate g = sigmoid(q)")
        ax.set_ylim(0, 1)
        ax.set_title("gate mean per layer")
        if len(history[0]["gate_mean"]) <= 16:
            ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_score_histograms(batches, path: str | Path, threshold: float | None, formula: str) -> Path:
    """Score histogram per dataset, selection cut marked. ``batches()`` streams tables with ``dataset``
    and ``score``; it is called twice (range, then counts) so no corpus is held in memory."""
    import numpy as np

    low, high = np.inf, -np.inf
    for batch in batches():
        if batch.num_rows:
            scores = batch["score"].to_numpy(zero_copy_only=False)
            low, high = min(low, scores.min()), max(high, scores.max())
    if not np.isfinite(low):
        low, high = 0.0, 1.0
    edges = np.linspace(low, high if high > low else low + 1e-6, 61)
    counts: dict[str, np.ndarray] = {}
    for batch in batches():
        scores = np.asarray(batch["score"].to_numpy(zero_copy_only=False), dtype=np.float64)
        names = np.asarray(batch["dataset"].to_pylist())
        for name in np.unique(names):
            hist, _ = np.histogram(scores[names == name], bins=edges)
            counts[name] = counts.get(name, 0) + hist
    fig, ax = plt.subplots(figsize=(7, 4))
    centres = (edges[:-1] + edges[1:]) / 2
    for name in sorted(counts):
        ax.step(centres, counts[name], where="mid", label=name)
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label="selection cut")
    ax.set_xlabel(f"score = {formula}")
    ax.set_ylabel("rows")
    ax.set_title("stage 2: scores per dataset")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

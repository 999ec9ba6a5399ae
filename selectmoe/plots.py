"""PNG plots for stage outputs and reports (matplotlib, headless)."""

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

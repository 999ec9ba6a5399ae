"""The run-level figures of ``report.md`` (matplotlib, headless): gates per layer, composition."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_gate_layers(history: list[dict], path: str | Path) -> Path:
    """Mean +- std of the gates per layer at the first and the last logged step."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = np.arange(len(history[-1]["gate_mean"]))
    for label, m in (("first step", history[0]), ("last step", history[-1])):
        ax.errorbar(layers, m["gate_mean"], yerr=m["gate_std"], marker="o", capsize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("gate g (mean +- std over tokens)")
    ax.set_ylim(0, 1)
    ax.set_title("stage 1: gate statistics per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_selection_composition(composition: dict[str, dict[str, int]], path: str | Path) -> Path:
    """Share of each source dataset in the corpus and in each selection (grouped bars)."""
    import numpy as np

    names = sorted({name for counts in composition.values() for name in counts})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(composition))
    for i, (label, counts) in enumerate(composition.items()):
        total = sum(counts.values()) or 1
        ax.bar(
            np.arange(len(names)) + i * width, [counts.get(n, 0) / total for n in names], width, label=label
        )
    ax.set_xticks(np.arange(len(names)) + width * (len(composition) - 1) / 2, names, rotation=20)
    ax.set_ylabel("share of rows")
    ax.set_title("selection composition by source dataset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

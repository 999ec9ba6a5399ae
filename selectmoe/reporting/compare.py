"""``selectmoe compare``: several evaluation runs side by side as one markdown table.

    selectmoe compare outputs/run_a outputs/run_b

Rows are task/metric pairs; values carry lm-eval's standard error, and every run after the first
gets a column with its difference from the first and, under the table, the rows where that difference
is beyond noise (over twice the two standard errors combined).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from selectmoe.evaluate.results import MISSING, MetricRow, find_results, metric_rows


def compare_runs(run_dirs: list[str], labels: list[str] | None = None) -> str:
    """Several runs side by side as markdown: a value ± stderr column per run, a delta column per
    run after the first (its value minus the first run's), one row per task/metric."""
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    files = [find_results(run_dir) for run_dir in run_dirs]
    labels = labels or _labels(run_dirs)
    runs = [
        {(row.task, row.metric): row for row in metric_rows(json.loads(f.read_text(encoding="utf-8")))}
        for f in files
    ]
    keys = list(dict.fromkeys(key for run in runs for key in run))

    header = ["task", "metric", labels[0]]
    for label in labels[1:]:
        header += [label, f"Δ {label}"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for key in keys:
        baseline = runs[0].get(key)
        cells = [*key, _cell(baseline)]
        for run in runs[1:]:
            row = run.get(key)
            delta = f"{row.value - baseline.value:+.4f}" if row and baseline else MISSING
            cells += [_cell(row), delta]
        lines.append("| " + " | ".join(cells) + " |")
    legend = [f"- {label}: {path}" for label, path in zip(labels, files)]
    note = f"Δ = run minus {labels[0]}; ± = lm-eval's standard error."
    verdicts = [_beyond_noise(label, run, runs[0], keys) for label, run in zip(labels[1:], runs[1:])]
    return "\n".join([*lines, "", note, *verdicts, "", *legend]) + "\n"


def _beyond_noise(label: str, run: dict, first: dict, keys: list) -> str:
    """One line: the rows where ``run`` differs from the first run by more than twice the standard error
    of the difference (the two runs' errors combined as if independent)."""
    judged = [k for k in keys if k in run and k in first and None not in (run[k].stderr, first[k].stderr)]
    beyond = [
        f"{' '.join(k)} ({run[k].value - first[k].value:+.4f})"
        for k in judged
        if abs(run[k].value - first[k].value) > 2 * math.hypot(run[k].stderr, first[k].stderr)
    ]
    unjudged = len(keys) - len(judged)
    return (
        f"{label}: beyond noise (|Δ| over two standard errors of the difference) in {len(beyond)} of "
        f"{len(judged)} rows{': ' + ', '.join(beyond) if beyond else ''}"
        + (f"; {unjudged} without a standard error not judged." if unjudged else ".")
    )


def _labels(run_dirs: list[str]) -> list[str]:
    """Folder names, or the paths as given when two folders share a name."""
    names = [Path(run_dir).name or str(run_dir) for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def _cell(row: MetricRow | None) -> str:
    if row is None:
        return MISSING
    return f"{row.value:.4f}" if row.stderr is None else f"{row.value:.4f} ± {row.stderr:.4f}"

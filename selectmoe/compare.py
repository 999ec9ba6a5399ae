"""Markdown tables of lm-eval results: one run (stage 4's ``results.md``) or several side by side.

    selectmoe compare outputs/run_a outputs/run_b

A run is a stage-4 output folder, a pipeline run folder holding one ``stage_4*`` folder, or a
``results.json`` file. Rows are task/metric pairs; values carry lm-eval's standard error, and
every run after the first gets a column with its difference from the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "results.json"
_MISSING = "–"


@dataclass(frozen=True)
class MetricRow:
    task: str
    metric: str  # "acc", or "exact_match (get-answer)" when lm-eval applied a named filter
    value: float
    stderr: float | None


def metric_rows(results: dict[str, Any]) -> list[MetricRow]:
    """The metrics of an lm-eval results dict, in its task order (a group after its subtasks)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            # metric keys are "name,filter"; "alias", "sample_len", "sample_count" are not metrics
            if "," not in key or "_stderr," in key or not _is_number(value):
                continue
            name, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            label = name if filter_name == "none" else f"{name} ({filter_name})"
            rows.append(MetricRow(task, label, float(value), float(stderr) if _is_number(stderr) else None))
    return rows


def results_table(results: dict[str, Any]) -> str:
    """One run as a markdown table: task, metric, value, stderr."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for row in metric_rows(results):
        stderr = _MISSING if row.stderr is None else f"{row.stderr:.4f}"
        lines.append(f"| {row.task} | {row.metric} | {row.value:.4f} | {stderr} |")
    return "\n".join(lines) + "\n"


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
            delta = f"{row.value - baseline.value:+.4f}" if row and baseline else _MISSING
            cells += [_cell(row), delta]
        lines.append("| " + " | ".join(cells) + " |")
    legend = [f"- {label}: {path}" for label, path in zip(labels, files)]
    note = f"Δ = run minus {labels[0]}; ± = lm-eval's standard error."
    return "\n".join([*lines, "", note, "", *legend]) + "\n"


def find_results(run_dir: str | Path) -> Path:
    """``results.json`` of a stage-4 folder, of the one ``stage_4*`` folder in a pipeline run, or
    the file itself."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / RESULTS).exists():
        return path / RESULTS
    found = sorted(path.glob(f"stage_4*/{RESULTS}"))
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path} holds several stage-4 results; name one: {[str(f.parent) for f in found]}")
    raise FileNotFoundError(f"no {RESULTS} in {path} or in a stage_4* folder inside it")


def _labels(run_dirs: list[str]) -> list[str]:
    """Folder names, or the paths as given when two folders share a name."""
    names = [Path(run_dir).name or str(run_dir) for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def _cell(row: MetricRow | None) -> str:
    if row is None:
        return _MISSING
    return f"{row.value:.4f}" if row.stderr is None else f"{row.value:.4f} ± {row.stderr:.4f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

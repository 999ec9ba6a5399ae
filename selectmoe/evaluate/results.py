"""lm-eval results as rows and as stage 4's ``results.md`` table; where a run's results file is.

A run is a stage-4 output folder, a pipeline run folder holding one stage-4 folder, or a
``results.json`` file. Rows are task/metric pairs with lm-eval's standard error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe.layout import RESULTS, STAGE_DIRS

MISSING = "–"


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
        stderr = MISSING if row.stderr is None else f"{row.stderr:.4f}"
        lines.append(f"| {row.task} | {row.metric} | {row.value:.4f} | {stderr} |")
    return "\n".join(lines) + "\n"


def find_results(run_dir: str | Path) -> Path:
    """``results.json`` of a stage-4 folder, of the one stage-4 folder in a pipeline run, or the
    file itself."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / RESULTS).exists():
        return path / RESULTS
    found = sorted(path.glob(f"{STAGE_DIRS['evaluate']}/{RESULTS}"))
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path} holds several stage-4 results; name one: {[str(f.parent) for f in found]}")
    raise FileNotFoundError(f"no {RESULTS} in {path} or in a {STAGE_DIRS['evaluate']} folder inside it")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

"""An evaluation's few-shot example as a chat row (target examples for ``selection.target_eval_dir``)."""

from __future__ import annotations

from typing import Any


def shot_row(task: str, name: str, prompt: str, reply: str) -> dict[str, Any]:
    """The row's ``task`` (and dataset) is the benchmark: similarity selection takes turns over them."""
    return {
        "dataset": task,
        "id": f"{task}_shot_{name}",
        "task": task,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
    }

"""ARC-Challenge from ``DATA_DIR/arc/ARC-Challenge-{Test,Dev}.jsonl``.

A row is ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``; labels are
A-E or 1-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

TEMPLATE = Path(__file__).with_name("arc_challenge_local_template.yaml")


def task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``arc_challenge_local`` YAML body, or nothing when the Test or Dev file is missing."""
    test_file = data_dir / "arc" / "ARC-Challenge-Test.jsonl"
    dev_file = data_dir / "arc" / "ARC-Challenge-Dev.jsonl"
    if not (test_file.exists() and dev_file.exists()):
        return {}
    return {
        "arc_challenge_local": {
            "include": str(TEMPLATE),
            "task": "arc_challenge_local",
            "dataset_kwargs": {"data_files": {"test": str(test_file), "validation": str(dev_file)}},
        }
    }


def to_choices(rows: datasets.Dataset) -> datasets.Dataset:
    """lm-eval ``process_docs`` hook: ``{"id", "question", "choices": [text], "gold": index}``."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        choices = row["question"]["choices"]
        labels = [choice["label"] for choice in choices]
        return {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": [choice["text"] for choice in choices],
            "gold": labels.index(row["answerKey"]),
        }

    return rows.map(convert, remove_columns=rows.column_names)

"""MMLU from ``DATA_DIR/mmlu/{dev,test}/SUBJECT_{dev,test}.csv``: one task per subject + the group.

The CSV header is ``question,choice0,choice1,choice2,choice3,answer`` (answer = index 0-3).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets

from selectmoe.evaluate.tasks.shots import shot_row

TEMPLATE = Path(__file__).with_name("mmlu_local_template.yaml")


def task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """YAML bodies by file stem: ``mmlu_local_SUBJECT`` per subject with both CSVs, and ``mmlu_local``."""
    test_dir, dev_dir = data_dir / "mmlu" / "test", data_dir / "mmlu" / "dev"
    subjects = sorted(
        path.name.removesuffix("_test.csv")
        for path in test_dir.glob("*_test.csv")
        if (dev_dir / path.name.replace("_test.csv", "_dev.csv")).exists()
    )
    yamls: dict[str, dict[str, Any]] = {
        f"mmlu_local_{subject}": {
            "include": str(TEMPLATE),
            "task": f"mmlu_local_{subject}",
            "task_alias": subject,
            "description": _description(subject),
            "dataset_kwargs": {
                "test_file": str(test_dir / f"{subject}_test.csv"),
                "dev_file": str(dev_dir / f"{subject}_dev.csv"),
            },
        }
        for subject in subjects
    }
    if yamls:
        # accuracy over all questions, as MMLU (and LESS) report it
        yamls["mmlu_local"] = {
            "group": "mmlu_local",
            "task": list(yamls),
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
            "metadata": {"version": 1.0},
        }
    return yamls


def shot_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Each subject's 5 dev questions (the evaluation's shots) as chat rows in the evaluation's prompt:
    question and lettered choices from the user, the answer's letter from the assistant."""
    rows = []
    for dev_file in sorted((data_dir / "mmlu" / "dev").glob("*_dev.csv")):
        subject = dev_file.name.removesuffix("_dev.csv")
        for i, shot in enumerate(_read_csv(str(dev_file)).to_list()[:5]):
            choices = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", shot["choices"]))
            prompt = f"{_description(subject)}{shot['question'].strip()}{choices}\nAnswer:"
            rows.append(shot_row("mmlu", f"{subject}_{i}", prompt, "ABCD"[shot["answer"]]))
    return rows


def _description(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def load_subject(test_file: str, dev_file: str, **_task_metadata: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` hook. Read with ``csv`` so every choice stays text (pandas reads
    choices such as ``0`` or ``1.50`` as numbers)."""
    return datasets.DatasetDict({"test": _read_csv(test_file), "dev": _read_csv(dev_file)})


def _read_csv(path: str) -> datasets.Dataset:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [
            {
                "question": row["question"],
                "choices": [row[f"choice{i}"] for i in range(4)],
                "answer": int(row["answer"]),
            }
            for row in csv.DictReader(fh)
        ]
    return datasets.Dataset.from_list(rows)

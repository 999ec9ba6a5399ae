"""GSM8K from ``DATA_DIR/gsm8k/test.jsonl``: ``{"question", "answer"}``, the answer ending in ``#### N``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

TEMPLATE = Path(__file__).with_name("gsm8k_local_template.yaml")
_MARKED = re.compile(r"####\s*(\S+)")
_NUMBER = re.compile(r"-?[$\d,]*\.?\d+")


def task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``gsm8k_local`` YAML body, or nothing when the test file is missing."""
    test_file = data_dir / "gsm8k" / "test.jsonl"
    if not test_file.exists():
        return {}
    return {
        "gsm8k_local": {
            "include": str(TEMPLATE),
            "task": "gsm8k_local",
            "dataset_kwargs": {"data_files": {"test": str(test_file)}},
        }
    }


def add_final_answer(rows: datasets.Dataset) -> datasets.Dataset:
    """lm-eval ``process_docs`` hook: adds ``final``, the canonical number after ``####``."""
    return rows.map(lambda row: {"final": canonical_number(_MARKED.search(row["answer"]).group(1))})


def extract_final_numbers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: the number after ``####``, else the last number in the text."""
    return [[_final_number(text) for text in generations] for generations in resps]


def _final_number(text: str) -> str:
    marked = _MARKED.search(text)
    if marked:
        return canonical_number(marked.group(1))
    numbers = _NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else ""


def canonical_number(text: str) -> str:
    """``"$1,000.00."`` -> ``"1000"``: no currency sign, thousands separators, final full stop or
    trailing decimal zeros, so that equal numbers compare equal as text."""
    number = text.replace(",", "").replace("$", "").rstrip(".")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number

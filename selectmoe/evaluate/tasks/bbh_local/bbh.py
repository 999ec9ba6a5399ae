"""BIG-Bench Hard from ``DATA_DIR/bbh/TASK.json`` + ``DATA_DIR/bbh/cot-prompts/TASK.txt``.

``TASK.json`` is ``{"examples": [{"input", "target"}]}``; a cot-prompts file is a canary line,
``-----``, the task description, then three ``Q: ...\\nA: Let's think step by step. ...`` shots.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from selectmoe.evaluate.tasks.shots import shot_row

TEMPLATE = Path(__file__).with_name("bbh_local_template.yaml")
_COT_OPENING = "Let's think step by step."
_ANSWER = re.compile(r"[Tt]he answer is (.+)")


def task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """YAML bodies by file stem: ``bbh_local_TASK`` per task with a CoT prompt, and ``bbh_local``."""
    bbh_dir = data_dir / "bbh"
    yamls: dict[str, dict[str, Any]] = {}
    for data_file in sorted(bbh_dir.glob("*.json")):
        prompt_file = bbh_dir / "cot-prompts" / f"{data_file.stem}.txt"
        if not prompt_file.exists():
            continue
        description, shots = parse_cot_prompt(prompt_file.read_text(encoding="utf-8"))
        yamls[f"bbh_local_{data_file.stem}"] = {
            "include": str(TEMPLATE),
            "task": f"bbh_local_{data_file.stem}",
            "task_alias": data_file.stem,
            "description": f"{description}\n\n" if description else "",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}, "field": "examples"},
            "fewshot_config": {"sampler": "first_n", "samples": shots},
        }
    if yamls:
        # the mean over tasks, as LESS reports BBH
        yamls["bbh_local"] = {
            "group": "bbh_local",
            "task": list(yamls),
            "aggregate_metric_list": [
                {"metric": "exact_match", "filter_list": "get-answer", "weight_by_size": False}
            ],
            "metadata": {"version": 1.0},
        }
    return yamls


def shot_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Each task's 3 CoT shots (the evaluation's) as chat rows in the evaluation's prompt."""
    rows = []
    for prompt_file in sorted((data_dir / "bbh" / "cot-prompts").glob("*.txt")):
        description, shots = parse_cot_prompt(prompt_file.read_text(encoding="utf-8"))
        for i, shot in enumerate(shots):
            prompt = f"{description}\n\nQ: {shot['input']}" if description else f"Q: {shot['input']}"
            reply = f"{_COT_OPENING}\n{shot['target']}"  # as the evaluation prompts it
            rows.append(shot_row("bbh", f"{prompt_file.stem}_{i}", prompt, reply))
    return rows


def parse_cot_prompt(text: str) -> tuple[str, list[dict[str, str]]]:
    """-> (task description, shots as ``{"input", "target"}`` with the reasoning as target)."""
    body = text.split("-----\n", 1)[-1].strip()
    description, *blocks = re.split(r"(?:^|\n\n)Q: ", body)
    shots = []
    for block in blocks:
        question, answer = block.split("\nA: ", 1)
        shots.append({"input": question.strip(), "target": answer.removeprefix(_COT_OPENING).strip()})
    return description.strip(), shots


def extract_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: the sentence after the first "the answer is" (its line, up to a
    full stop); the whole generation when the phrase is missing."""
    return [[_extract_answer(text) for text in generations] for generations in resps]


def _extract_answer(text: str) -> str:
    found = _ANSWER.search(text)
    answer = found.group(1).split(". ")[0] if found else text
    return answer.strip().removesuffix(".").strip()

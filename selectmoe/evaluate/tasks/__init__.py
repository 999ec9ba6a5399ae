"""Offline lm-eval tasks over a local folder of evaluation sets (air-gapped clusters, tests).

Each family folder holds a template YAML (prompt, metrics, generation settings, ``!function``
hooks) and a module whose ``task_yamls(data_dir)`` lists the tasks found under the data folder.
``write_local_tasks`` writes those task YAMLs, which include their template by absolute path and
name the data files by absolute path, into a folder for ``TaskManager(include_path=...)``:
no hub access, and nothing is copied out of the data folder.

Families (data layout under ``DATA_DIR``; metrics):
- ``mmlu_local``: group of ``mmlu_local_SUBJECT``, ``mmlu/{dev,test}/SUBJECT_{dev,test}.csv``;
  5-shot letter choice, ``acc`` (weighted by subject size).
- ``bbh_local``: group of ``bbh_local_TASK``, ``bbh/TASK.json`` + ``bbh/cot-prompts/TASK.txt``;
  3-shot CoT generation, ``exact_match`` under the ``get-answer`` filter (mean over tasks).
- ``tydiqa_local``: group of ``tydiqa_local_LANG``, ``tydiqa/LANG_tydiqa_dev.json``; GoldP 1-shot
  generation, ``f1`` and ``exact_match`` (mean over languages).
- ``arc_challenge_local``: ``arc/ARC-Challenge-{Test,Dev}.jsonl``; ``acc``, ``acc_norm``.
- ``gsm8k_local``: ``gsm8k/test.jsonl``; 5-shot generation, ``exact_match`` under ``final-number``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from selectmoe.evaluate.tasks.arc_challenge_local import arc
from selectmoe.evaluate.tasks.bbh_local import bbh
from selectmoe.evaluate.tasks.gsm8k_local import gsm8k
from selectmoe.evaluate.tasks.mmlu_local import mmlu
from selectmoe.evaluate.tasks.tydiqa_local import tydiqa

LOCAL_TASKS: dict[str, Callable[[Path], dict[str, dict[str, Any]]]] = {
    "mmlu_local": mmlu.task_yamls,
    "bbh_local": bbh.task_yamls,
    "tydiqa_local": tydiqa.task_yamls,
    "arc_challenge_local": arc.task_yamls,
    "gsm8k_local": gsm8k.task_yamls,
}


# the few-shot examples LESS took as its target tasks' examples, by benchmark
LESS_SHOTS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "mmlu": mmlu.shot_rows,
    "bbh": bbh.shot_rows,
    "tydiqa": tydiqa.shot_rows,
}


def less_shot_rows(data_dir: str | Path) -> list[dict[str, Any]]:
    """The LESS benchmarks' shots under ``data_dir`` (this module's layout) as chat rows, ``task`` = the
    benchmark: MMLU's 5 dev questions per subject, BBH's 3 CoT shots per task, TyDi QA's 1 per language."""
    root = Path(data_dir).resolve()
    rows = [row for shot_rows in LESS_SHOTS.values() for row in shot_rows(root)]
    if not rows:
        raise FileNotFoundError(
            f"{root}: no mmlu/dev/*_dev.csv, bbh/cot-prompts/*.txt or tydiqa/*_tydiqa_dev.json "
            "(the layout is in selectmoe/evaluate/tasks/__init__.py)"
        )
    return rows


def local_family(task: str) -> str | None:
    """The family a task name belongs to (``mmlu_local_anatomy`` -> ``mmlu_local``), or None."""
    for family in LOCAL_TASKS:
        if task == family or task.startswith(f"{family}_"):
            return family
    return None


def available_local_tasks(data_dir: str | Path) -> list[str]:
    """The families with data under ``data_dir``."""
    root = Path(data_dir).resolve()
    return [family for family, task_yamls in LOCAL_TASKS.items() if task_yamls(root)]


def write_local_tasks(data_dir: str | Path, out_dir: str | Path, families: list[str]) -> Path:
    """Write the task (and group) YAMLs of ``families`` for the data in ``data_dir`` into
    ``out_dir/FAMILY/``; returns ``out_dir``. Fails naming the family when its data is missing."""
    root, out = Path(data_dir).resolve(), Path(out_dir)
    for family in families:
        yamls = LOCAL_TASKS[family](root)
        if not yamls:
            raise FileNotFoundError(f"no data for {family} under {root} (layouts: selectmoe/eval_tasks)")
        family_dir = out / family
        family_dir.mkdir(parents=True, exist_ok=True)
        for stem, body in yamls.items():
            text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000)
            (family_dir / f"{stem}.yaml").write_text(text, encoding="utf-8")
    return out

"""The demo corpus: a generated instruction mixture shaped like the LESS mix, with planted defects.

``write_demo_corpus(out_dir, seed)`` writes::

    out_dir/train/{cot,flan_v2,dolly,oasst1}.jsonl   LESS rows, one file per source dataset
    out_dir/labels.jsonl                             {"id", "dataset", "quality", "defect"} per row
    out_dir/eval/...                                 small evaluation sets (see synthetic_eval)

A ``defect_rate`` share of rows (30% by default) gets one defect of each kind of
``selectmoe.demo.defects`` in its final assistant reply, the kinds in equal numbers (``wrong_answer``
uses the generator's own wrong answer). Scoring never reads ``labels.jsonl``; evaluation does.

Deterministic: the same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from selectmoe.demo.defects import DEFECT_KINDS, plant_defects
from selectmoe.demo.synthetic_eval import write_demo_eval
from selectmoe.demo.synthetic_tasks import GENERATORS, Example

DATASET_SHARES = {"cot": 0.35, "flan_v2": 0.35, "dolly": 0.1, "oasst1": 0.2}  # about the LESS mix
DEFAULT_ROWS = 8000  # about 3 MB of training rows
DEFECT_RATE = 0.3
LABELS_FILE = "labels.jsonl"


def write_demo_corpus(
    out_dir: str | Path,
    seed: int = 0,
    n_rows: int = DEFAULT_ROWS,
    defect_rate: float = DEFECT_RATE,
    eval_questions: int = 30,
) -> Path:
    """Write the training files, their labels and the evaluation sets; returns ``out_dir``."""
    out = Path(out_dir)
    rng = random.Random(seed)
    rows, examples = _generate_rows(rng, n_rows)
    labels = plant_defects(rng, rows, defect_rate, DEFECT_KINDS, wrong_reply=lambda i, _: examples[i].wrong)

    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for dataset in DATASET_SHARES:
        _write_jsonl(train_dir / f"{dataset}.jsonl", [row for row in rows if row["dataset"] == dataset])
    _write_jsonl(out / LABELS_FILE, labels)
    write_demo_eval(out / "eval", seed=seed, n_questions=eval_questions)
    return out


def _generate_rows(rng: random.Random, n_rows: int) -> tuple[list[dict], list[Example]]:
    rows, examples = [], []
    for dataset, count in _rows_per_dataset(n_rows).items():
        for index in range(count):
            example = GENERATORS[dataset](rng)
            rows.append({"dataset": dataset, "id": f"{dataset}_{index:06d}", "messages": example.messages})
            examples.append(example)
    return rows, examples


def _rows_per_dataset(n_rows: int) -> dict[str, int]:
    """Shares of ``n_rows`` by largest remainder, so the counts add up to ``n_rows``."""
    exact = {name: share * n_rows for name, share in DATASET_SHARES.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: n_rows - sum(counts.values())]:
        counts[name] += 1
    return counts


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

"""The demo corpus: a generated instruction mixture shaped like the LESS mix, with planted defects.

``write_demo_corpus(out_dir, seed)`` writes::

    out_dir/train/{cot,flan_v2,dolly,oasst1}.jsonl   LESS rows, one file per source dataset
    out_dir/labels.jsonl                             {"id", "dataset", "quality", "defect"} per row
    out_dir/eval/...                                 small evaluation sets (see synthetic_eval)

A ``defect_rate`` share of rows (30% by default) gets one defect of a named kind in its final
assistant reply, the kinds in equal numbers: ``garbled`` (characters replaced by symbols),
``shuffled`` (words, or the letters of a short reply, shuffled), ``swapped`` (another row's reply),
``wrong_answer`` (a fluent reply with a wrong answer), ``truncated`` (cut off mid-reply),
``empty_ish`` (".", "N/A", ...), ``spam`` (a promotional phrase repeated). Every defective row is
still a valid row: the defects are of quality, not of format, so the data layer accepts them all
and only a quality score can find them. Scoring never reads ``labels.jsonl``; evaluation does.

Deterministic: the same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from selectmoe.data.synthetic_eval import write_demo_eval
from selectmoe.data.synthetic_facts import EMPTYISH_RESPONSES, SPAM_PHRASES
from selectmoe.data.synthetic_tasks import GENERATORS, Example

DATASET_SHARES = {"cot": 0.35, "flan_v2": 0.35, "dolly": 0.1, "oasst1": 0.2}  # about the LESS mix
DEFECT_KINDS = ("garbled", "shuffled", "swapped", "wrong_answer", "truncated", "empty_ish", "spam")
DEFAULT_ROWS = 8000  # about 3 MB of training rows
DEFECT_RATE = 0.3
LABELS_FILE = "labels.jsonl"
_GARBLE_CHARS = "#$%&@!?*~^+=<>|"


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
    labels = _plant_defects(rng, rows, examples, defect_rate)

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


def _plant_defects(rng: random.Random, rows: list[dict], examples: list[Example], rate: float) -> list[dict]:
    """Spoil the final reply of ``rate`` of the rows in place; returns one label per row."""
    originals = [row["messages"][-1]["content"] for row in rows]
    defect_of = _choose_defects(rng, originals, round(rate * len(rows)))
    labels = []
    for index, row in enumerate(rows):
        kind = defect_of.get(index)
        if kind is not None:
            spoiled = _spoil(
                kind, originals[index], examples[index], _donor_reply(rng, originals, index), rng
            )
            row["messages"][-1] = {"role": "assistant", "content": spoiled}
        labels.append(
            {
                "id": row["id"],
                "dataset": row["dataset"],
                "quality": "clean" if kind is None else "defect",
                "defect": kind,
            }
        )
    return labels


def _choose_defects(rng: random.Random, replies: list[str], n_defects: int) -> dict[int, str]:
    """row index -> defect kind, the kinds in equal numbers; ``truncated`` only where there is
    something to cut (a one-word answer such as "C" cannot be visibly truncated), so it picks first."""
    counts = {kind: n_defects // len(DEFECT_KINDS) for kind in DEFECT_KINDS}
    for kind in DEFECT_KINDS[: n_defects % len(DEFECT_KINDS)]:
        counts[kind] += 1
    chosen: dict[int, str] = {}
    for kind in sorted(DEFECT_KINDS, key=lambda kind: kind != "truncated"):
        free = [
            i for i, reply in enumerate(replies) if i not in chosen and (kind != "truncated" or " " in reply)
        ]
        for index in rng.sample(free, min(counts[kind], len(free))):
            chosen[index] = kind
    return chosen


def _donor_reply(rng: random.Random, originals: list[str], index: int) -> str:
    while True:
        donor = originals[rng.randrange(len(originals))]
        if donor != originals[index]:
            return donor


def _spoil(kind: str, reply: str, example: Example, donor: str, rng: random.Random) -> str:
    if kind == "garbled":
        return _garble(reply, rng)
    if kind == "shuffled":
        return _shuffle(reply, rng)
    if kind == "swapped":
        return donor
    if kind == "wrong_answer":
        return example.wrong
    if kind == "truncated":
        return _truncate(reply, rng)
    if kind == "empty_ish":
        return rng.choice(EMPTYISH_RESPONSES)
    return " ".join([rng.choice(SPAM_PHRASES)] * rng.randint(4, 12))


def _garble(reply: str, rng: random.Random) -> str:
    chars = [rng.choice(_GARBLE_CHARS) if not ch.isspace() and rng.random() < 0.4 else ch for ch in reply]
    if "".join(chars) == reply:  # a very short reply the dice spared
        chars[0] = rng.choice(_GARBLE_CHARS)
    return "".join(chars)


def _shuffle(reply: str, rng: random.Random) -> str:
    words = reply.split()
    pieces, joiner = (words, " ") if len(set(words)) >= 3 else (list(reply), "")
    shuffled = list(pieces)
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != pieces:
            return joiner.join(shuffled)
    return joiner.join(reversed(pieces)) if pieces[::-1] != pieces else f"{reply} {reply}"


def _truncate(reply: str, rng: random.Random) -> str:
    cut = rng.randint(max(1, len(reply) // 4), max(1, len(reply) // 2))
    head = reply[:cut]
    if " " in head.strip():  # end on a word boundary when there is one
        head = head[: head.rstrip().rfind(" ")]
    return head.rstrip() or reply[0]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

"""A corpus no score, weight or default was chosen on: the evaluation sets of ``../shared/data/eval`` as
instruction rows.

Every selection benchmark so far drew its real rows from ``../shared/data/train`` (FLAN CoT, FLAN v2,
OpenAssistant, human-written instructions), and every key of the default was chosen on them. This
writes the published evaluation sets, in the product's row format, into a folder that ``loko.py
--data-dir`` and ``downstream_proxy.py --data-dir`` read in their place, one file per source (the row's
``dataset``), at most ``--per-source`` rows each (a seeded sample):

- ``gsm8k``: test question -> the published answer (worked steps with ``<<calculator>>`` notes, ``#### N``);
- ``arc``: ARC-Challenge dev + test question with lettered options -> ``(C) the option's text``;
- ``mmlu``: test question with lettered options -> the same form;
- ``bbh``: BIG-Bench Hard input -> its target (often a bare ``(B)``, ``True`` or a word);
- ``tydiqa_english``: TyDi QA GoldP English dev passage and question -> the first gold answer span.

Short replies (bbh, tydiqa) and long worked ones (gsm8k) sit side by side, as in a real mix. Nothing is
cleaned or filtered; the rows are written as the files hold them. The data stays outside the project:
write it under ``/tmp``.

``--set unseen`` writes rows that corpus does not hold, for re-checking what was mended after seeing it
(the reply redundancy of 2026-12-07): TyDi QA GoldP dev in Finnish, Indonesian and Swahili
(``tydiqa_LANGUAGE``, in the English rows' form), the MMLU dev split (``mmlu_dev``) and the BBH rows that
the first set's sample left out (``bbh_rest``; give the same ``--per-source`` and ``--seed`` as that
corpus, by default both sets' defaults).

``--set third`` writes rows neither set holds, written before any result on them was seen, for re-checking
what was chosen after seeing the first two (reply strata, 2026-12-08): TyDi QA GoldP dev in Russian, Korean
and Arabic, the MMLU test rows the first set's sample left out (``mmlu_rest``), and the worked examples of
BBH's chain-of-thought prompts (``bbh_cot``: question -> "Let's think step by step." ... "So the answer is X.").

    .venv/bin/python benchmarks/eval_corpus.py /tmp/selectmoe_eval_corpus
    .venv/bin/python benchmarks/eval_corpus.py --set unseen /tmp/selectmoe_eval_unseen
    .venv/bin/python benchmarks/eval_corpus.py --set third /tmp/selectmoe_eval_third
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import random
from pathlib import Path

from common import EVAL_DIR

SETS = {
    "first": ("gsm8k", "arc", "mmlu", "bbh", "tydiqa_english"),
    "unseen": ("tydiqa_finnish", "tydiqa_indonesian", "tydiqa_swahili", "mmlu_dev", "bbh_rest"),
    "third": ("tydiqa_russian", "tydiqa_korean", "tydiqa_arabic", "mmlu_rest", "bbh_cot"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    p.add_argument("--per-source", type=int, default=1500, help="at most this many rows per source (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        default="first",
        choices=list(SETS),
        help="unseen: rows the first set does not hold; third: rows neither holds",
    )
    args = p.parse_args()
    counts = write_eval_corpus(args.eval_dir, args.out, args.per_source, args.seed, args.set)
    for source, n in counts.items():
        print(f"{source:16s} {n:6d} rows")
    print(f"wrote {sum(counts.values())} rows to {args.out}")


def write_eval_corpus(
    eval_dir: Path, out: Path, per_source: int = 1500, seed: int = 0, name: str = "first"
) -> dict[str, int]:
    """``out/SOURCE.jsonl`` for each source of the set ``name``; returns the rows written per source."""
    others = sorted(p.name for p in out.glob("*.jsonl") if p.stem not in SETS[name])
    if others:  # the benchmarks read every file of the folder
        raise SystemExit(f"{out} holds other JSON lines files ({', '.join(others)}): give an empty folder")
    sources = {}
    for source in SETS[name]:
        if source.endswith("_rest"):  # what the first set's sample of that source left out
            every_row = READERS[source.removesuffix("_rest")](eval_dir)
            kept = {r["id"] for r in seeded_sample(every_row, per_source, seed, source.removesuffix("_rest"))}
            rows = [{**r, "dataset": source} for r in every_row if r["id"] not in kept]
            if not rows:
                raise SystemExit(
                    f"--per-source {per_source}: the first set holds every row of {source}'s source"
                )
        else:
            rows = READERS[source](eval_dir)
        sources[source] = seeded_sample(rows, per_source, seed, source)
    out.mkdir(parents=True, exist_ok=True)
    for source, rows in sources.items():
        with (out / f"{source}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {source: len(rows) for source, rows in sources.items()}


def seeded_sample(rows: list[dict], n: int, seed: int, source: str) -> list[dict]:
    """At most ``n`` of ``rows``, in their order (seeded by the seed and the source's name)."""
    if len(rows) <= n:
        return rows
    return [rows[i] for i in sorted(random.Random(f"{seed}/{source}").sample(range(len(rows)), n))]


def instruction_row(dataset: str, row_id: str, request: str, reply: str) -> dict:
    return {
        "dataset": dataset,
        "id": row_id,
        "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}],
    }


def lettered(question: str, options: list[tuple[str, str]]) -> str:
    return "\n".join([question, *(f"({label}) {text}" for label, text in options)])


def gsm8k_rows(eval_dir: Path) -> list[dict]:
    lines = (eval_dir / "gsm8k" / "test.jsonl").read_text().split("\n")
    items = [json.loads(line) for line in lines if line.strip()]
    return [
        instruction_row("gsm8k", f"gsm8k-test-{i}", it["question"], it["answer"])
        for i, it in enumerate(items)
    ]


def arc_rows(eval_dir: Path) -> list[dict]:
    rows = []
    for split in ("Dev", "Test"):
        for line in (eval_dir / "arc" / f"ARC-Challenge-{split}.jsonl").read_text().split("\n"):
            if not line.strip():
                continue
            item = json.loads(line)
            options = [(c["label"], c["text"]) for c in item["question"]["choices"]]
            answer = dict(options)[item["answerKey"]]
            request = lettered(item["question"]["stem"], options)
            rows.append(
                instruction_row("arc", f"arc-{item['id']}", request, f"({item['answerKey']}) {answer}")
            )
    return rows


def mmlu_rows(eval_dir: Path, split: str = "test") -> list[dict]:
    rows = []
    dataset = "mmlu" if split == "test" else f"mmlu_{split}"
    for path in sorted((eval_dir / "mmlu" / split).glob(f"*_{split}.csv")):
        subject = path.name.removesuffix(f"_{split}.csv")
        with path.open(newline="") as fh:
            for i, item in enumerate(csv.DictReader(fh)):
                options = [("ABCD"[k], item[f"choice{k}"]) for k in range(4)]
                label, answer = options[int(item["answer"])]
                request = lettered(item["question"], options)
                rows.append(
                    instruction_row(dataset, f"{dataset}-{subject}-{i}", request, f"({label}) {answer}")
                )
    return rows


def bbh_rows(eval_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((eval_dir / "bbh").glob("*.json")):
        for i, item in enumerate(json.loads(path.read_text())["examples"]):
            rows.append(instruction_row("bbh", f"bbh-{path.stem}-{i}", item["input"], item["target"]))
    return rows


def bbh_cot_rows(eval_dir: Path) -> list[dict]:
    """The worked examples of BBH's 3-shot chain-of-thought prompts, one row each: the question (with its
    options) -> "Let's think step by step." and the reasoning, ending "So the answer is X."."""
    rows = []
    for path in sorted((eval_dir / "bbh" / "cot-prompts").glob("*.txt")):
        for i, shot in enumerate(path.read_text().split("\n\nQ: ")[1:]):
            question, _, answer = shot.partition("\nA: ")
            rows.append(
                instruction_row("bbh_cot", f"bbh_cot-{path.stem}-{i}", question.strip(), answer.strip())
            )
    return rows


def mmlu_dev_rows(eval_dir: Path) -> list[dict]:
    return mmlu_rows(eval_dir, "dev")


def tydiqa_rows(eval_dir: Path, language: str) -> list[dict]:
    rows = []
    for article in json.loads((eval_dir / "tydiqa" / f"{language}_tydiqa_dev.json").read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                request = f"{paragraph['context']}\n\nQuestion: {qa['question']}"
                rows.append(
                    instruction_row(f"tydiqa_{language}", qa["id"], request, qa["answers"][0]["text"])
                )
    return rows


READERS = {
    "gsm8k": gsm8k_rows,
    "arc": arc_rows,
    "mmlu": mmlu_rows,
    "mmlu_dev": mmlu_dev_rows,
    "bbh": bbh_rows,
    "bbh_cot": bbh_cot_rows,
    **{
        f"tydiqa_{language}": functools.partial(tydiqa_rows, language=language)
        for language in ("english", "finnish", "indonesian", "swahili", "russian", "korean", "arabic")
    },
}


if __name__ == "__main__":
    main()

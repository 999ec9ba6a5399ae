"""The generated demo corpus: deterministic, fully labelled, every defect kind planted, valid rows,
and evaluation files the local lm-eval tasks can read."""

from __future__ import annotations

import copy
import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_TRAIN

from selectmoe.config import DataConfig, DatasetConfig
from selectmoe.data import RowLedger, iter_rows, load_tokenizer
from selectmoe.demo.corpus import DATASET_SHARES, DEFAULT_ROWS, write_demo_corpus
from selectmoe.demo.defects import DEFECT_KINDS, HELD_OUT_KINDS, cot_wrong_answer, plant_defects
from selectmoe.demo.synthetic_facts import CANNED_REPLIES, EMPTYISH_RESPONSES, SPAM_PHRASES
from selectmoe.evaluate.tasks import LOCAL_TASKS, available_local_tasks
from selectmoe.evaluate.tasks.bbh_local.bbh import parse_cot_prompt

N_ROWS = 350


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0, n_rows=N_ROWS)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_rows(root: Path) -> dict[str, dict]:
    return {row["id"]: row for path in sorted((root / "train").glob("*.jsonl")) for row in read_jsonl(path)}


def test_same_seed_same_bytes_other_seed_other_rows(corpus, tmp_path):
    again = write_demo_corpus(tmp_path / "again", seed=0, n_rows=N_ROWS)
    other = write_demo_corpus(tmp_path / "other", seed=1, n_rows=N_ROWS)
    assert files_of(again) == files_of(corpus)
    assert files_of(other)["train/cot.jsonl"] != files_of(corpus)["train/cot.jsonl"]
    assert set(files_of(other)) == set(files_of(corpus))


def test_one_file_per_source_dataset_in_the_less_mix(corpus):
    rows = train_rows(corpus)
    assert sorted(p.stem for p in (corpus / "train").glob("*.jsonl")) == sorted(DATASET_SHARES)
    counts = Counter(row["dataset"] for row in rows.values())
    assert sum(counts.values()) == N_ROWS
    for name, share in DATASET_SHARES.items():
        assert abs(counts[name] - share * N_ROWS) <= 1
    assert any(len(row["messages"]) > 2 for row in rows.values() if row["dataset"] == "oasst1")
    assert all(row["messages"][-1]["content"] for row in rows.values())


def test_labels_cover_every_id_with_every_defect_kind_at_the_rate(corpus):
    labels = read_jsonl(corpus / "labels.jsonl")
    rows = train_rows(corpus)
    assert sorted(label["id"] for label in labels) == sorted(rows)
    kinds = Counter(label["defect"] for label in labels if label["quality"] == "defect")
    assert set(kinds) == set(DEFECT_KINDS)
    assert sum(kinds.values()) == round(0.3 * N_ROWS)
    assert max(kinds.values()) - min(kinds.values()) <= 1
    assert all((label["quality"] == "clean") == (label["defect"] is None) for label in labels)


def test_each_defect_spoils_the_final_reply(corpus, tmp_path):
    clean = train_rows(write_demo_corpus(tmp_path / "clean", seed=0, n_rows=N_ROWS, defect_rate=0.0))
    rows = train_rows(corpus)
    for label in read_jsonl(corpus / "labels.jsonl"):
        row, original = rows[label["id"]], clean[label["id"]]
        assert row["messages"][:-1] == original["messages"][:-1]
        reply, original_reply = row["messages"][-1]["content"], original["messages"][-1]["content"]
        if label["defect"] is None:
            assert reply == original_reply
            continue
        assert reply != original_reply, label
        if label["defect"] == "empty_ish":
            assert reply in EMPTYISH_RESPONSES
        elif label["defect"] == "spam":
            assert any(reply.count(phrase) >= 4 for phrase in SPAM_PHRASES)
        elif label["defect"] == "truncated":
            assert original_reply.startswith(reply) and len(reply) < len(original_reply)
        elif label["defect"] == "shuffled":
            assert sorted(reply.replace(" ", "")) == sorted(original_reply.replace(" ", ""))


def test_every_row_passes_validation(corpus, tokenizer_dir):
    cfg = DatasetConfig(
        data_dir=str(corpus / "train"), dataset_names=list(DATASET_SHARES), max_sequence_length=512
    )
    ledger = RowLedger.from_config(cfg, DataConfig(), seed=0)
    rows = list(iter_rows(cfg, ledger, tokenizer=load_tokenizer(tokenizer_dir)))
    assert list(ledger.rejected()) == []
    assert {row["id"] for row in rows} == set(train_rows(corpus))
    assert ledger.counts()["rows_accepted"] == N_ROWS


def test_default_size_is_a_few_megabytes(tmp_path):
    out = write_demo_corpus(tmp_path, seed=0)
    size = sum(p.stat().st_size for p in (out / "train").glob("*.jsonl"))
    assert 1_000_000 < size < 8_000_000
    assert len(read_jsonl(out / "labels.jsonl")) == DEFAULT_ROWS


# ---------------------------------------------------------------------------- evaluation sets


def test_eval_sets_have_the_published_layouts(corpus):
    eval_dir = corpus / "eval"
    for split, rows in (("dev", 5), ("test", None)):
        files = sorted((eval_dir / "mmlu" / split).glob(f"*_{split}.csv"))
        assert len(files) == 4
        for path in files:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                assert next(reader) == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
                body = list(reader)
            assert rows is None or len(body) == rows
            assert all(len(set(r[1:5])) == 4 and r[5] in "0123" for r in body)

    for row in read_jsonl(eval_dir / "gsm8k" / "test.jsonl"):
        assert re.search(r"\n#### -?\d+$", row["answer"]) and row["question"].endswith("?")

    for split in ("Dev", "Test"):
        for row in read_jsonl(eval_dir / "arc" / f"ARC-Challenge-{split}.jsonl"):
            labels = [choice["label"] for choice in row["question"]["choices"]]
            assert labels == ["A", "B", "C", "D"] and row["answerKey"] in labels

    for task in ("multistep_arithmetic_two", "word_sorting"):
        examples = json.loads((eval_dir / "bbh" / f"{task}.json").read_text())["examples"]
        assert examples and all(set(e) == {"input", "target"} for e in examples)
        description, shots = parse_cot_prompt((eval_dir / "bbh" / "cot-prompts" / f"{task}.txt").read_text())
        assert description and len(shots) == 3
        assert all("So the answer is " in shot["target"] for shot in shots)

    articles = json.loads((eval_dir / "tydiqa" / "english_tydiqa_dev.json").read_text())["data"]
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = answer["answer_start"]
                assert paragraph["context"][start : start + len(answer["text"])] == answer["text"]


def test_the_local_lm_eval_tasks_find_every_set(corpus):
    assert available_local_tasks(corpus / "eval") == list(LOCAL_TASKS)


def test_bbh_arithmetic_targets_are_right(corpus):
    examples = json.loads((corpus / "eval" / "bbh" / "multistep_arithmetic_two.json").read_text())["examples"]
    for example in examples:
        expression = example["input"].removesuffix(" =")
        assert re.fullmatch(r"[-+*() 0-9]+", expression)
        assert str(eval(expression)) == example["target"]  # the generator's own arithmetic, checked by Python


def test_cot_wrong_answer_changes_only_the_final_answer_to_one_of_the_same_form():
    rng = random.Random(0)
    cases = {
        "2240-1120 = 1120 So the answer is (C).": r"2240-1120 = 1120 So the answer is \([ABDE]\)\.",
        "It is regulated. So the answer is yes.": r"It is regulated\. So the answer is no\.",
        "Birds fly. So the answer is Sentence B.": r"Birds fly\. So the answer is Sentence A\.",
        "13 - 1 = 12 hours. So the answer is 12.": r"13 - 1 = 12 hours\. So the answer is \d+\.",
    }
    for reply, expected in cases.items():
        wrong = cot_wrong_answer(reply, rng)
        assert re.fullmatch(expected, wrong) and wrong != reply, (reply, wrong)
    assert cot_wrong_answer("The answer is a house.", rng) is None  # no CoT ending
    assert cot_wrong_answer("So the answer is a house.", rng) is None  # free text: no same-form wrong answer


def test_plant_defects_on_real_rows_applies_each_kind_only_where_it_can():
    lines = (SHARED_TRAIN / "cot.jsonl").read_text().split("\n")[:150]
    lines += (SHARED_TRAIN / "oasst1.jsonl").read_text().split("\n")[:150]
    rows = [json.loads(line) for line in lines if line.strip()]
    originals = copy.deepcopy(rows)
    kinds = ("garbled", "swapped", "truncated", "spam", "wrong_answer")
    wrong_rng = random.Random(1)
    labels = plant_defects(
        random.Random(0),
        rows,
        0.3,
        kinds,
        wrong_reply=lambda i, reply: (
            cot_wrong_answer(reply, wrong_rng) if rows[i]["dataset"] == "cot" else None
        ),
    )
    counts = Counter(label["defect"] for label in labels if label["defect"])
    assert counts == {kind: 18 for kind in kinds}  # 30% of 300, the kinds in equal numbers
    for label, row, original in zip(labels, rows, originals):
        assert row["messages"][:-1] == original["messages"][:-1]
        changed = row["messages"][-1]["content"] != original["messages"][-1]["content"]
        assert changed == (label["defect"] is not None), label
        if label["defect"] == "wrong_answer":
            assert row["dataset"] == "cot"
            assert "So the answer is" in row["messages"][-1]["content"]


def test_held_out_kinds_spoil_real_replies_as_named():
    """The held-out kinds (kept out of the demo and of every weight choice) on real rows: ``looped``,
    ``echo``, ``restated``, ``doubled``, ``canned``."""
    lines = (SHARED_TRAIN / "oasst1.jsonl").read_text().split("\n")[:100]
    rows = [json.loads(line) for line in lines if line.strip()]
    originals = copy.deepcopy(rows)
    labels = plant_defects(random.Random(0), rows, 1.0, HELD_OUT_KINDS)
    assert Counter(label["defect"] for label in labels) == {kind: 20 for kind in HELD_OUT_KINDS}
    cut_short = []
    for label, row, original in zip(labels, rows, originals):
        reply, before = row["messages"][-1]["content"], original["messages"][-1]["content"]
        request = [m["content"] for m in original["messages"][:-1] if m["role"] == "user"][-1]
        assert row["messages"][:-1] == original["messages"][:-1] and reply != before
        if label["defect"] == "echo":
            assert reply == request
        elif label["defect"] == "looped":
            head = " ".join(before.split()[:3])
            assert reply.startswith(head) and reply.count(head) >= 3
        elif label["defect"] == "restated":
            # the request, then the reply's opening only (a reply of one sentence stays whole)
            opening = reply.split(f'"{request}" ', 1)[1]
            assert reply.startswith("You asked:") and opening and before.startswith(opening)
            cut_short.append(len(opening) < len(before.strip()))
        elif label["defect"] == "doubled":
            assert reply == f"{before}\n\n{before}"
        else:
            assert label["defect"] == "canned" and reply in CANNED_REPLIES
    assert sum(cut_short) >= 15  # most oasst replies have more than one sentence
    assert set(HELD_OUT_KINDS).isdisjoint(DEFECT_KINDS)

"""The generated demo corpus: deterministic, fully labelled, every defect kind planted, valid rows,
and evaluation files the local lm-eval tasks can read."""

from __future__ import annotations

import copy
import csv
import html
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
from selectmoe.demo.defects import (
    CITE_LEADS,
    CITE_VERBS,
    CITED_ANSWERS,
    DEFECT_KINDS,
    HELD_OUT_KINDS,
    PLACEHOLDER_LABELS,
    applies,
    cot_wrong_answer,
    placeholder_slot,
    plant_defects,
    request_of,
    spoil,
)
from selectmoe.demo.synthetic_facts import (
    BOILERPLATE_CAVEATS,
    BOILERPLATE_CLOSINGS,
    BOILERPLATE_LEADS,
    BOILERPLATE_OPENINGS,
    CANNED_REPLIES,
    CHAT_PAGE_DIV_CLASSES,
    EMPTYISH_RESPONSES,
    MERGED_TASKS,
    PLACEHOLDER_FORMS,
    SPAM_PHRASES,
)
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
    ``echo``, ``restated``, ``doubled``, ``canned``, ``boilerplate``, ``scraped``, ``merged``, ``cited``,
    ``falsified``, ``placeholder``."""
    lines = (SHARED_TRAIN / "oasst1.jsonl").read_text().split("\n")[:220]
    rows = [json.loads(line) for line in lines if line.strip()]
    originals = copy.deepcopy(rows)
    replies = [row["messages"][-1]["content"] for row in originals]
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
        elif label["defect"] == "boilerplate":
            assert is_buried_in_boilerplate(reply, before)
        elif label["defect"] == "scraped":
            assert is_scraped(reply, before)
        elif label["defect"] == "merged":
            assert is_merged(reply, before)
        elif label["defect"] == "cited":
            assert is_cited(reply, before, [other for other in replies if other != before])
        elif label["defect"] == "falsified":
            assert is_falsified(reply, before), (before, reply)
        elif label["defect"] == "placeholder":
            assert is_placeholder(reply, before), (before, reply)
        else:
            assert label["defect"] == "canned" and reply in CANNED_REPLIES
    assert sum(cut_short) >= 15  # most oasst replies have more than one sentence
    assert set(HELD_OUT_KINDS).isdisjoint(DEFECT_KINDS)


PREAMBLES = {f"{opening} {lead}" for opening in BOILERPLATE_OPENINGS for lead in BOILERPLATE_LEADS}
CLOSINGS = {
    *BOILERPLATE_CLOSINGS,
    *(f"{caveat} {c}" for caveat in BOILERPLATE_CAVEATS for c in BOILERPLATE_CLOSINGS),
}


WORD_COUNT = r"Copy\d+ chars / \d+ words$"  # a browser extension's counter, scraped into ShareGPT


def boilerplate_of(spoiled: str) -> tuple[str, str, str]:
    """A ``boilerplate`` reply's first paragraph, the paragraphs between, its last paragraph."""
    preamble, rest = spoiled.split("\n\n", 1)
    body, closing = rest.rsplit("\n\n", 1)
    return preamble, body, closing


def is_buried_in_boilerplate(spoiled: str, reply: str) -> bool:
    if spoiled.count("\n\n") < 2:
        return False
    preamble, body, closing = boilerplate_of(spoiled)
    return preamble in PREAMBLES and body == reply.strip() and closing in CLOSINGS


def page_leftover(spoiled: str) -> tuple[str | None, bool]:
    """What a ``scraped`` reply carries of the page: its ``<div>``'s opening tag or its regenerate counter,
    and whether a word count ends it."""
    head = re.match(r'<div class="[^"]*">|[1-3] / [1-3]', spoiled)
    return (head.group() if head else None), bool(re.search(WORD_COUNT, spoiled))


def is_scraped(spoiled: str, reply: str) -> bool:
    """``spoiled`` carries the page's HTML or leftovers, and what FastChat's ShareGPT cleaning removes (tags,
    the leading regenerate counter, "Copy code", the word count) is all that was added, up to whitespace
    (and the code fences its HTML conversion rebuilds)."""
    head = re.match(r'<div class="([^"]*)">.*</div>$|[1-3] / [1-3]', spoiled, re.DOTALL)
    if head is None or (head.group(1) is not None and head.group(1) not in CHAT_PAGE_DIV_CLASSES):
        return False
    text = html.unescape(re.sub(r"<[^>]+>", "", spoiled)) if head.group(1) else spoiled
    text = re.sub(rf"^[1-3] / [1-3]|{WORD_COUNT}|Copy code|```", "", text)
    return re.sub(r"\s+", "", text) == re.sub(r"\s+", "", reply.replace("```", ""))


# Alpaca-cleaned's check for merged instructions (its tools/tool_mergedInstructions.py)
MERGED_CHECK = re.compile(r"\d{1,2}\.\sInstruction:", re.IGNORECASE)
MERGED_TASK = re.compile(r"(\d+)\. Instruction: (.+)\n\1\. Input:\n(.+)\n\1\. Output:\n(.+)", re.DOTALL)


def merged_tasks_of(spoiled: str, reply: str) -> list[tuple[int, tuple[str, str, str]]] | None:
    """The numbered tasks (number, (instruction, input, output)) that a ``merged`` reply runs on into after
    ``reply``, each after a "###" or "##" line; None where ``spoiled`` is not ``reply`` run on so."""
    head = reply.rstrip()
    separator = re.match(r"\n#{2,3}\n", spoiled[len(head) :]) if spoiled.startswith(head) else None
    if separator is None:
        return None
    tasks = []
    for block in spoiled[len(head) + separator.end() :].split(separator.group()):
        match = MERGED_TASK.fullmatch(block)
        if match is None:
            return None
        number, instruction, task_input, output = match.groups()
        tasks.append((int(number), (instruction, "" if task_input == "<noinput>" else task_input, output)))
    return tasks


def is_merged(spoiled: str, reply: str) -> bool:
    """``spoiled`` is ``reply`` run on into one to three different tasks of the pool, numbered on from 2 to at
    most 19 (the self-instruct prompt asks for 20 tasks)."""
    tasks = merged_tasks_of(spoiled, reply)
    if not tasks or len(tasks) > 3:
        return False
    numbers = [number for number, _ in tasks]
    return (
        numbers == list(range(numbers[0], numbers[0] + len(tasks)))
        and 2 <= numbers[0] <= numbers[-1] <= 19
        and len({task for _, task in tasks}) == len(tasks)
        and all(task in MERGED_TASKS for _, task in tasks)
    )


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(map(re.escape, words))


CITE = re.compile(
    rf'(?:{_alternatives(CITE_LEADS)}) (.+?) (?:{_alternatives(CITE_VERBS)}), "(.+)"'
    rf"|(.+?) (?:{_alternatives(CITE_VERBS)}):\n> (.+)"
)
# LIMA's filter for answers that reference other answers ("as mentioned", "stack exchange", ...), as a pattern
OTHER_ANSWER = re.compile(
    rf"\b(?:answer (?:above|below)|(?:accepted|other|top|earlier|stack exchange) answer)\b"
    rf"|@[a-z]+\d* (?:{_alternatives(CITE_VERBS)})\b",
    re.IGNORECASE,
)


def cited_of(spoiled: str, reply: str) -> tuple[str, str] | None:
    """The (reference, quote) of the paragraph that a ``cited`` reply adds before or after ``reply``; None where
    ``spoiled`` is not ``reply`` with such a paragraph."""
    body = reply.strip()
    if spoiled.startswith(f"{body}\n\n"):
        cite = spoiled[len(body) + 2 :]
    elif spoiled.endswith(f"\n\n{body}"):
        cite = spoiled[: -len(body) - 2]
    else:
        return None
    match = CITE.fullmatch(cite)
    if match is None:
        return None
    reference = match.group(1) or match.group(3)
    return reference[0].lower() + reference[1:], match.group(2) or match.group(4)


def is_cited(spoiled: str, reply: str, donors: list[str]) -> bool:
    """``spoiled`` is ``reply`` whole, with a paragraph citing another answer (or its "@" author) and quoting
    a run of words of one of the ``donors`` (other rows' replies)."""
    parts = cited_of(spoiled, reply)
    if parts is None:
        return False
    reference, quote = parts
    quote = quote.removesuffix(" ...")
    return (reference in CITED_ANSWERS or bool(re.fullmatch(r"@[a-z]{4,12}\d{0,2}", reference))) and any(
        quote in " ".join(donor.split()) for donor in donors
    )


def family_style_replies(rng: random.Random) -> list[str]:
    """Replies like ``benchmarks/downstream_proxy.py``'s family rows: a made-up language's word (syllables of
    its own two consonants) for an English word, in the pool's three answer templates."""
    templates = (
        "In {lang}, '{word}' is {code}.",
        "They say {code}.",
        "The {lang} word for '{word}' is {code}.",
    )
    replies = []
    for lang, consonants in (("Zorbish", "bd"), ("Quellan", "fg")):
        for word in ("cat", "river", "moon", "bread", "winter"):
            code = "".join(rng.choice(consonants) + rng.choice("aeiou") for _ in range(3))
            replies += [template.format(lang=lang, word=word, code=code) for template in templates]
    return replies


def real_replies() -> list[str]:
    """Final replies of real rows: CoT, FLAN (short spans and yes/no), oasst1 (some with code), human."""
    lines = (SHARED_TRAIN / "cot.jsonl").read_text().split("\n")[:20]
    flan = (SHARED_TRAIN / "flan_v2.jsonl").read_text().split("\n")
    lines += flan[:20] + flan[1378:1388]
    lines += (SHARED_TRAIN / "oasst1.jsonl").read_text().split("\n")[:30]
    lines += (SHARED_TRAIN / "human_instructions.jsonl").read_text().split("\n")[:20]
    return [json.loads(line)["messages"][-1]["content"] for line in lines if line.strip()]


@pytest.mark.parametrize("kind", ["boilerplate", "scraped"])
def test_boilerplate_and_scraped_spoil_real_and_family_replies_in_varied_deterministic_ways(kind):
    """The held-out kinds modelled on junk that cleaning work found in ShareGPT and ChatGPT-distilled data:
    the answer kept whole, inside AI-assistant boilerplate or the chat page's markup and button text."""
    real, family = real_replies(), family_style_replies(random.Random(3))
    assert any("```" in reply for reply in real) and any(reply in ("Yes", "No") for reply in real)

    def spoiled_with(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [spoil(kind, reply, rng, donor="another reply") for reply in real + family]

    spoiled = spoiled_with(0)
    assert spoiled == spoiled_with(0)
    assert sum(a != b for a, b in zip(spoiled, spoiled_with(1))) > len(spoiled) // 2
    is_spoiled_so = is_buried_in_boilerplate if kind == "boilerplate" else is_scraped
    for reply, spoiled_reply in zip(real + family, spoiled):
        assert applies(kind, reply, None) and spoiled_reply != reply
        assert is_spoiled_so(spoiled_reply, reply), (reply, spoiled_reply)
    for group in (spoiled[: len(real)], spoiled[len(real) :]):  # the added junk varies across rows
        if kind == "boilerplate":
            added = [boilerplate_of(s)[::2] for s in group]
            assert len(set(added)) >= len(group) // 2
        else:
            added = [page_leftover(s) for s in group]
            assert len(set(added)) >= 8
            assert any(s.startswith("<div") for s in group) and not all(s.startswith("<div") for s in group)


def test_merged_runs_real_and_family_replies_on_into_further_tasks_in_varied_deterministic_ways():
    """The held-out kind modelled on the "merged instructions" that Alpaca-cleaned found in Stanford Alpaca's
    outputs: the answer kept whole, then further numbered tasks of the self-instruct prompt, which
    Alpaca-cleaned's own check finds in every spoiled reply and in no real one."""
    real, family = real_replies(), family_style_replies(random.Random(3))

    def spoiled_with(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [spoil("merged", reply, rng, donor="another reply") for reply in real + family]

    spoiled = spoiled_with(0)
    assert spoiled == spoiled_with(0)
    assert sum(a != b for a, b in zip(spoiled, spoiled_with(1))) > len(spoiled) // 2
    for reply, spoiled_reply in zip(real + family, spoiled):
        assert applies("merged", reply, None) and is_merged(spoiled_reply, reply), (reply, spoiled_reply)
        assert MERGED_CHECK.search(spoiled_reply) and not MERGED_CHECK.search(reply)
    tasks = [merged_tasks_of(s, reply) for s, reply in zip(spoiled, real + family)]
    assert {len(t) for t in tasks} == {1, 2, 3}
    assert len({task for t in tasks for _, task in t}) >= len(MERGED_TASKS) * 3 // 4  # the run-on tasks vary
    assert len({t[0][0] for t in tasks}) >= 10  # and so do the numbers they start from
    separators = {s[len(reply.rstrip()) :].split("\n", 2)[1] for s, reply in zip(spoiled, real + family)}
    assert separators == {"##", "###"}


def spoiled_deterministically_by_seed(kind: str, replies: list[str], donors: list[str]) -> list[str]:
    """The replies spoiled by ``kind`` with seed 0, after checking that the same seed gives the same replies
    and another seed other replies for most of them."""

    def spoiled_with(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [spoil(kind, reply, rng, donor) for reply, donor in zip(replies, donors)]

    spoiled = spoiled_with(0)
    assert spoiled == spoiled_with(0)
    assert sum(a != b for a, b in zip(spoiled, spoiled_with(1))) > len(spoiled) // 2
    return spoiled


def test_cited_quotes_other_rows_in_real_and_family_replies_in_varied_deterministic_ways():
    """The held-out kind modelled on the Stack Exchange answers that reference other answers, which LIMA removed:
    the answer kept whole, beside a paragraph that cites an absent answer and quotes another row's reply, so the
    quotes vary as the corpus does and the scaffolding around them stays short."""
    replies = real_replies() + family_style_replies(random.Random(3))
    donors = replies[7:] + replies[:7]

    spoiled = spoiled_deterministically_by_seed("cited", replies, donors)
    for reply, donor, spoiled_reply in zip(replies, donors, spoiled):
        assert applies("cited", reply, None)
        assert is_cited(spoiled_reply, reply, [donor]), (reply, spoiled_reply)
        assert OTHER_ANSWER.search(spoiled_reply) and not OTHER_ANSWER.search(reply)
    parts = [cited_of(s, reply) for s, reply in zip(spoiled, replies)]
    assert len({quote for _, quote in parts}) >= len(replies) * 3 // 4  # the quotes vary with the donors
    assert len({reference for reference, _ in parts}) >= 10  # and the references, "@" authors among them
    assert {s.startswith(reply.strip()) for s, reply in zip(spoiled, replies)} == {True, False}
    assert {"\n> " in s for s in spoiled} == {True, False}
    scaffolding = [
        len(s) - len(reply.strip()) - len(quote) for s, reply, (_, quote) in zip(spoiled, replies, parts)
    ]
    assert max(scaffolding) <= 55 and sum(scaffolding) < 0.1 * sum(map(len, spoiled))


def test_boilerplate_scraped_merged_and_cited_leave_blank_replies_alone():
    """FLAN rows with blank replies (TREC, in the shared data) have no answer to bury, page to scrape, end to
    run on from or cite by."""
    rows = [
        json.loads(line) for line in (SHARED_TRAIN / "flan_v2.jsonl").read_text().split("\n")[14590:14620]
    ]
    blank = [not row["messages"][-1]["content"].strip() for row in rows]
    assert 0 < sum(blank) < len(rows)
    originals = copy.deepcopy(rows)
    labels = plant_defects(random.Random(0), rows, 1.0, ("boilerplate", "scraped", "merged", "cited"))
    for label, row, original, is_blank in zip(labels, rows, originals, blank):
        assert (label["defect"] is None) == is_blank
        assert (row == original) == is_blank
    for kind in ("boilerplate", "scraped", "merged", "cited"):
        assert not applies(kind, "", None) and not applies(kind, " \n", None)
        assert applies(kind, "B", None) and applies(kind, "They say bodaba.", None)


def test_cited_caps_the_quote_falls_back_to_the_request_and_refuses_a_blank_reply():
    """The quote is at most 40 words of the donor (" ..." marks the cut); a blank donor (FLAN's TREC rows)
    gives the row's own request; a blank reply has nothing to cite beside."""
    long_donor = " ".join(f"w{i}" for i in range(100)) + "."
    _, quote = cited_of(spoil("cited", "The answer.", random.Random(0), long_donor), "The answer.")
    assert quote == " ".join(f"w{i}" for i in range(40)) + " ..."
    request = "What is the capital of France?"
    spoiled = spoil("cited", "Paris.", random.Random(1), " \n", request=request)
    assert cited_of(spoiled, "Paris.")[1] == request
    with pytest.raises(ValueError, match="a blank reply has nothing to cite"):
        spoil("cited", " ", random.Random(0), "", request="")


# ---------------------------------------------------------------------------- falsified

MAX_FALSIFIED = 8  # distinct details that a ``falsified`` reply changes at most
CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


def falsified_changes(spoiled: str, reply: str) -> list[tuple[str, str]] | None:
    """The (original, replacement) word pairs where ``spoiled`` differs from ``reply``, "a"/"an" apart; None
    where it differs otherwise than word for word (a word or number added, dropped or split, other
    punctuation, space or code)."""
    before, after = re.split(r"(\w+)", reply), re.split(r"(\w+)", spoiled)
    if len(before) != len(after) or before[::2] != after[::2] or CODE.findall(reply) != CODE.findall(spoiled):
        return None
    return [
        (a, b) for a, b in zip(before[1::2], after[1::2]) if a != b and {a.lower(), b.lower()} != {"a", "an"}
    ]


def is_falsified(spoiled: str, reply: str) -> bool:
    """``spoiled`` is ``reply`` word for word but for a few of its details (``MAX_FALSIFIED`` at most), each
    replaced by a false one of its form wherever it changed: a number by a number one digit apart, a word by
    another word (and "a"/"an" before it agreeing); the punctuation, spacing and code all kept."""
    changes = falsified_changes(spoiled, reply)
    if not changes:
        return False
    words: dict[str, str] = {}
    for a, b in changes:
        if any(ch.isdigit() for ch in a + b):  # one digit changed, nothing else
            differ = [(x, y) for x, y in zip(a, b) if x != y]
            if len(a) != len(b) or len(differ) != 1 or not (differ[0][0] + differ[0][1]).isdigit():
                return False
        elif not (a.isalpha() and b.isalpha()) or a.lower() == b.lower():
            return False  # a word is replaced by another word,
        elif words.setdefault(a.lower(), b.lower()) != b.lower():
            return False  # the same one everywhere
    return len({a.lower() for a, _ in changes}) <= MAX_FALSIFIED


def added_ngrams(spoiled: str, reply: str, n: int = 5) -> set[tuple[str, ...]]:
    """The word ``n``-grams of ``spoiled`` that ``reply`` lacks: what a spoiling added or changed."""

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    return grams(spoiled) - grams(reply)


def test_falsified_changes_a_few_details_of_real_and_family_replies_in_varied_deterministic_ways():
    """The held-out kind modelled on the fluent but wrong outputs of model-generated instruction data: the
    reply word for word, with a few of its details (numbers, opposites, option letters, names, terms) replaced
    by false ones of the same form taken from the row's own text or another row's, so nothing recurs across
    rows."""
    replies = real_replies() + family_style_replies(random.Random(3))
    donors = replies[7:] + replies[:7]

    spoiled = spoiled_deterministically_by_seed("falsified", replies, donors)
    for reply, spoiled_reply in zip(replies, spoiled):
        assert applies("falsified", reply, None) and spoiled_reply != reply
        assert is_falsified(spoiled_reply, reply), (reply, spoiled_reply)
        assert len(spoiled_reply.split()) == len(reply.split())  # nothing added: fluent as the reply was
    changes = [change for s, reply in zip(spoiled, replies) for change in falsified_changes(s, reply)]
    assert any(a.isdigit() for a, _ in changes)  # numbers,
    assert {("yes", "no"), ("no", "yes")} & {(a.lower(), b.lower()) for a, b in changes}  # answers turned,
    assert any(a[0].isupper() and b[0].isupper() and a.isalpha() for a, b in changes)  # names
    assert len({b.lower() for _, b in changes}) >= len(replies) * 3 // 4  # and the false details vary
    # no phrase pool: the most common 5-gram that the spoiling adds or changes is in 5% of the rows at most (a
    # CoT row's "So the answer is B" with its letter changed), where a pool's ("As an AI language model") is
    # in many
    rng = random.Random(0)
    pooled = [spoil("boilerplate", reply, rng, donor) for reply, donor in zip(replies, donors)]
    for group in (range(len(replies) - 30), range(len(replies) - 30, len(replies))):  # real rows, family rows
        rows_with = Counter(gram for i in group for gram in added_ngrams(spoiled[i], replies[i]))
        assert max(rows_with.values()) <= len(group) // 20, rows_with.most_common(3)
        rows_with = Counter(gram for i in group for gram in added_ngrams(pooled[i], replies[i]))
        assert max(rows_with.values()) >= len(group) // 4
    words = sum(len(re.findall(r"\w+", reply)) for reply in replies)
    assert len(changes) < 0.2 * words  # a few details, not a rewrite


def test_falsified_plants_on_most_real_rows_keeping_options_and_code():
    """Planted on real rows of every source with their requests: each row with a word or number outside code
    is falsified (a number, name or term at every place, an option letter to another the request offers), its
    code kept; only blank replies (FLAN's TREC rows) are left alone."""
    lines = []
    for name, start in (("cot", 0), ("flan_v2", 14590), ("oasst1", 200), ("human_instructions", 0)):
        lines += (SHARED_TRAIN / f"{name}.jsonl").read_text().split("\n")[start : start + 60]
    rows = [json.loads(line) for line in lines if line.strip()]
    originals = copy.deepcopy(rows)
    labels = plant_defects(random.Random(0), rows, 1.0, ("falsified",))
    planted = [label["defect"] == "falsified" for label in labels]
    blank = [not row["messages"][-1]["content"].strip() for row in originals]
    assert sum(blank) > 0 and sum(planted) >= 0.97 * (len(rows) - sum(blank))
    for label, row, original in zip(labels, rows, originals):
        reply, before = row["messages"][-1]["content"], original["messages"][-1]["content"]
        assert (label["defect"] is None) == (not applies("falsified", before, None)) == (reply == before)
        if label["defect"] is None:
            assert not re.search(r"\w", CODE.sub("", before))
            continue
        assert is_falsified(reply, before), (before, reply)
        request = request_of(original)
        for a, b in falsified_changes(reply, before):
            if re.fullmatch(r"[A-E]", a) and re.search(rf"\({a}\)|Sentence {a}\b", request):
                assert re.search(rf"\({b}\)|Sentence {b}\b", request), (request, reply)
    assert any("```" in row["messages"][-1]["content"] for row, p in zip(rows, planted) if p)


def test_falsified_cases():
    """The forms of the false details: an opposite, an option letter the request offers, a number one digit
    apart (a list's number kept), a word of the donor's with "a"/"an" agreeing, a name for a name, code left
    alone."""
    rng = random.Random(0)
    assert spoil("falsified", "Yes", rng, "Blue.") == "No"
    assert spoil("falsified", "negative", rng, "") == "positive"
    request = (
        "Which one is against common sense?\nOptions:\n- Sentence A: ...\n- Sentence B: ...\n- Sentence C: .."
    )
    for seed in range(4):  # a short reply: any word may change; the option letter to another one offered
        spoiled = spoil("falsified", "So the answer is Sentence B.", random.Random(seed), "", request=request)
        assert spoiled in ("So the answer is Sentence A.", "So the answer is Sentence C.")
    spoiled = spoil("falsified", "1. Mix 250 grams.\n2. Bake.", random.Random(1), "")
    assert re.fullmatch(r"1\. Mix \d{3} grams\.\n2\. Bake\.", spoiled) and "250" not in spoiled
    assert spoil("falsified", "It is an apple.", rng, "The banana.") == "It is a banana."
    # a longer reply: its names (or numbers, ..., words of the request), not its other words
    reply = "The prize went to Alice Smith, who had worked on the problem for many long years."
    spoiled = spoil("falsified", reply, rng, "Then Bob Jones left.")
    assert spoiled in (reply.replace("Alice", "Bob"), reply.replace("Smith", "Bob"))
    reply = (
        "Put the `apple` here, then wait for it to settle:\n```python\napple = 1\n```\nThe apple is ready."
    )
    spoiled = spoil("falsified", reply, rng, "The banana.", request="Tell me about the apple.")
    assert spoiled == reply.replace("The apple", "The banana")


def test_falsified_refuses_a_reply_without_a_detail():
    """A blank reply, code only, emoji or another script has no word or number to falsify: ``applies`` says so
    and ``spoil`` raises."""
    for reply in ("", " \n", "```python\nx = 1\n```", "- 😌😊", "她周一去了学校。"):
        assert not applies("falsified", reply, None)
        with pytest.raises(ValueError, match="no detail to falsify"):
            spoil("falsified", reply, random.Random(0), "A donor reply.", request="A request?")
    for reply in ("B", "Yes", "5", "They say bodaba.", "e3a82186438a9a2ef80c2a3fdba0182fb9b2d5f1"):
        assert applies("falsified", reply, None)


# ---------------------------------------------------------------------------- placeholder


# every slot a ``placeholder`` reply can have -> (its form, what its label stands in for)
SLOTS = {
    placeholder_slot(form, label): (form, kind)
    for form in PLACEHOLDER_FORMS
    for kind, labels in PLACEHOLDER_LABELS.items()
    for label in labels
}
SLOT = re.compile("|".join(map(re.escape, sorted(SLOTS, key=len, reverse=True))))


def placeholder_fills(spoiled: str, reply: str) -> list[str] | None:
    """The texts of ``reply`` that the slots of ``spoiled`` stand in for, in order; None where ``spoiled`` is not
    ``reply`` with some of its text replaced by slots (or has none)."""
    if not SLOT.search(spoiled) or SLOT.search(reply):
        return None
    pattern = "(.+?)".join(map(re.escape, SLOT.split(spoiled)))
    match = re.fullmatch(pattern, reply, re.DOTALL)
    return list(match.groups()) if match else None


def is_placeholder(spoiled: str, reply: str) -> bool:
    """``spoiled`` is ``reply`` with one to six spans of it, each within a line and outside code blocks,
    replaced by slots written one way ("[Insert explanation here]", "{final_answer}", ...), and some of it kept
    (a reply of three words or fewer apart): a template left unfilled."""
    fills = placeholder_fills(spoiled, reply)
    if not fills or len(fills) > 6:
        return False
    forms = {SLOTS[slot][0] for slot in SLOT.findall(spoiled)}
    kept = SLOT.sub("", spoiled)
    return (
        len(forms) == 1
        and all(re.search(r"\w", fill) and "\n" not in fill and "```" not in fill for fill in fills)
        and (bool(re.search(r"\w", kept)) or len(reply.split()) <= 3)
        and CODE.findall(reply.replace("`", "")) == CODE.findall(spoiled.replace("`", ""))
        and re.findall(r"```.*?(?:```|$)", reply, re.DOTALL)
        == re.findall(r"```.*?(?:```|$)", spoiled, re.DOTALL)
    )


def test_placeholder_leaves_real_and_family_replies_unfilled_in_varied_deterministic_ways():
    """The held-out kind modelled on unfilled template placeholders ("[Your Name]", "[insert ... here]",
    "{answer}") in model-generated replies: the reply with some of its sentences (or its answer) replaced by
    slots, its layout, list marks and code kept."""
    replies = real_replies() + family_style_replies(random.Random(3))
    donors = replies[7:] + replies[:7]
    spoiled = spoiled_deterministically_by_seed("placeholder", replies, donors)
    for reply, spoiled_reply in zip(replies, spoiled):
        assert applies("placeholder", reply, None) and spoiled_reply != reply
        assert is_placeholder(spoiled_reply, reply), (reply, spoiled_reply)
        assert spoiled_reply.count("\n") == reply.count("\n")  # the layout kept
    slots = [slot for s in spoiled for slot in SLOT.findall(s)]
    assert {SLOTS[slot][0] for slot in slots} == set(PLACEHOLDER_FORMS)  # every way of writing a slot
    assert {SLOTS[slot][1] for slot in slots} == set(PLACEHOLDER_LABELS)  # answers, list items and sentences
    assert len(set(slots)) >= 30
    assert len(SLOTS) == len(PLACEHOLDER_FORMS) * sum(
        map(len, PLACEHOLDER_LABELS.values())
    )  # each tells its kind


def test_placeholder_cases():
    """A short answer replaced whole, a CoT answer after "the answer is", a list's sentences with their marks, a
    single sentence's tail; code blocks left alone; nothing to leave unfilled in a blank or code-only reply."""
    answer_slots = {slot for slot, (_, kind) in SLOTS.items() if kind == "answer"}
    for seed in range(5):
        rng = random.Random(seed)
        assert spoil("placeholder", "Paris", rng, "") in answer_slots
        spoiled = spoil("placeholder", "It is regulated. So the answer is yes.", rng, "")
        prefix, _, slot = spoiled.removesuffix(".").partition("So the answer is ")
        assert prefix == "It is regulated. " and slot in answer_slots
        reply = "Three tips:\n1. Drink water every single day.\n2. Sleep eight hours each night.\n3. Walk."
        spoiled = spoil("placeholder", reply, rng, "")
        lines, before = spoiled.split("\n"), reply.split("\n")
        assert lines[0] == before[0] and lines[3] == before[3]  # a heading and a short item: no sentence
        assert [line[:3] for line in lines[1:3]] == ["1. ", "2. "] and lines != before
        changed = [line[3:] for line, was in zip(lines[1:3], before[1:3]) if line != was]
        assert changed and all(line[:-1] in SLOTS and SLOTS[line[:-1]][1] == "item" for line in changed)
        reply = "The prize went to Alice Smith in the spring of that year"
        spoiled = spoil("placeholder", reply, rng, "")
        head, slot = SLOT.split(spoiled)[0], SLOT.findall(spoiled)
        assert reply.startswith(head) and head.startswith("The ") and slot and SLOT.split(spoiled)[1] == ""
        reply = (
            "Run this:\n```python\nprint('Hello there. Nice day.')\n```\nIt prints a greeting to the screen."
        )
        spoiled = spoil("placeholder", reply, rng, "")
        assert "```python\nprint('Hello there. Nice day.')\n```" in spoiled and is_placeholder(spoiled, reply)
    for reply in ("", " \n", "```python\nx = 1\n```", "- 😌😊", "★★★"):
        assert not applies("placeholder", reply, None)
        with pytest.raises(ValueError, match="nothing to leave unfilled"):
            spoil("placeholder", reply, random.Random(0), "A donor reply.")


def test_placeholder_applies_to_every_real_reply_with_a_word_outside_code():
    """Its share of each real train file (in ``applies``'s comment): every CoT row, FLAN's but its blank TREC
    replies and star ratings, oasst1's but a code-only reply, human_instructions' but an emoji-only one."""
    shares = {}
    for name in ("cot", "flan_v2", "oasst1", "human_instructions"):
        lines = (SHARED_TRAIN / f"{name}.jsonl").read_text().split("\n")
        rows = [json.loads(line) for line in lines if line.strip()]
        replies = [row["messages"][-1]["content"] for row in rows]
        applying = [applies("placeholder", reply, None) for reply in replies]
        shares[name] = round(100 * sum(applying) / len(replies), 2)
        for reply, ok in zip(replies, applying):
            assert ok == bool(re.search(r"\w", re.sub(r"```.*?(?:```|$)", "", reply, flags=re.DOTALL)))
    assert shares == {"cot": 100.0, "flan_v2": 97.05, "oasst1": 99.73, "human_instructions": 99.74}

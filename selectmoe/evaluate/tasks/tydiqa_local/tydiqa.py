"""TyDi QA GoldP from ``DATA_DIR/tydiqa/LANG_tydiqa_dev.json`` (SQuAD v1.1 layout).

``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}``
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from selectmoe.evaluate.tasks.shots import shot_row

TEMPLATE = Path(__file__).with_name("tydiqa_local_template.yaml")
_SUFFIX = "_tydiqa_dev.json"


def task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """YAML bodies by file stem: ``tydiqa_local_LANG`` per language file, and ``tydiqa_local``."""
    yamls: dict[str, dict[str, Any]] = {}
    for data_file in sorted((data_dir / "tydiqa").glob(f"*{_SUFFIX}")):
        language = data_file.name.removesuffix(_SUFFIX)
        yamls[f"tydiqa_local_{language}"] = {
            "include": str(TEMPLATE),
            "task": f"tydiqa_local_{language}",
            "task_alias": language,
            "dataset_kwargs": {"data_files": {"validation": str(data_file)}, "field": "data"},
        }
    if yamls:
        # the mean over languages, as LESS reports TyDi QA
        yamls["tydiqa_local"] = {
            "group": "tydiqa_local",
            "task": list(yamls),
            "aggregate_metric_list": [
                {"metric": "f1", "weight_by_size": False},
                {"metric": "exact_match", "weight_by_size": False},
            ],
            "metadata": {"version": 1.0},
        }
    return yamls


def shot_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Each language's first dev question (the evaluation takes its one shot from the same file) as a
    chat row in the evaluation's prompt."""
    rows = []
    for data_file in sorted((data_dir / "tydiqa").glob(f"*{_SUFFIX}")):
        articles = json.loads(data_file.read_text(encoding="utf-8"))["data"]
        paragraph = articles[0]["paragraphs"][0]
        qa = paragraph["qas"][0]
        prompt = (
            "Answer the following question based on the information in the given passage.\n\n"
            f"Passage: {paragraph['context']}\nQuestion: {qa['question']}\nAnswer:"
        )
        language = data_file.name.removesuffix(_SUFFIX)
        rows.append(shot_row("tydiqa", language, prompt, qa["answers"][0]["text"]))
    return rows


def flatten_articles(articles: datasets.Dataset) -> datasets.Dataset:
    """lm-eval ``process_docs`` hook: one row per question with its passage and gold answers."""
    rows = [
        {
            "id": qa["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [answer["text"] for answer in qa["answers"]],
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    return datasets.Dataset.from_list(rows)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook: the best exact match and token F1 over the gold answers."""
    prediction = _normalize(results[0])
    golds = [_normalize(answer) for answer in doc["answers"]]
    return {
        "exact_match": max(float(prediction == gold) for gold in golds),
        "f1": max(_token_f1(prediction, gold) for gold in golds),
    }


def _normalize(text: str) -> str:
    """SQuAD normalisation (lower case, no punctuation, no English articles, single spaces),
    with punctuation taken from Unicode categories so that it also holds for the other scripts."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, gold: str) -> float:
    predicted, expected = prediction.split(), gold.split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)

"""AUROC and precision@k, the numbers behind every separation table: against a brute-force pair
count on random scores with many ties, and on hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from selectmoe.metrics import (
    auroc,
    auroc_within_groups,
    paired_auroc_difference,
    precision_at_k,
    separation_table,
)


def brute_force_auroc(scores, positive) -> float:
    """P(a positive outscores a negative), ties counting half, by counting every pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=80).astype(float)  # few distinct values: many ties
    positive = rng.random(80) < 0.4
    assert auroc(scores, positive) == pytest.approx(brute_force_auroc(scores, positive), abs=1e-12)


def test_auroc_on_hand_made_cases():
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5  # all tied: chance
    # positives at 2 and 1, negatives at 1 and 0: pairs (2>1, 2>0, 1=1, 1>0) -> 3.5 / 4
    assert auroc([2, 1, 1, 0], [True, True, False, False]) == 0.875
    assert math.isnan(auroc([1, 2], [True, True]))  # one class only


def test_precision_at_k_counts_clean_rows_among_the_best_k():
    scores = [0.9, 0.8, 0.7, 0.1, 0.95]
    clean = [True, False, True, True, False]
    assert precision_at_k(scores, clean, 1) == 0.0  # 0.95 is a bad row
    assert precision_at_k(scores, clean, 3) == pytest.approx(1 / 3)  # 0.95, 0.9, 0.8
    assert precision_at_k(scores, clean, 5) == pytest.approx(3 / 5)
    # ties at the cut keep the earlier row (a stable order), as the selection's rank does
    assert precision_at_k([1.0, 1.0, 0.0], [False, True, True], 1) == 0.0
    assert math.isnan(precision_at_k(scores, clean, 0))


def test_separation_table_judges_each_defect_kind_against_the_clean_rows():
    defect = np.array(["", "", "garbled", "spam", "spam"], dtype=object)
    perfect = np.array([5.0, 4.0, 1.0, 2.0, 0.0])  # every clean row above every bad one
    columns, rows = separation_table({"perfect": perfect, "inverted": -perfect}, defect, k=2)
    assert columns == ["scorer", "auroc_all", "auroc_garbled", "auroc_spam", "precision_at_2"]
    best, worst = rows
    assert best["auroc_all"] == best["auroc_garbled"] == best["auroc_spam"] == best["precision_at_2"] == 1.0
    assert worst["auroc_all"] == worst["auroc_spam"] == worst["precision_at_2"] == 0.0


def test_within_dataset_auroc_sees_through_a_score_that_only_ranks_datasets():
    """Dataset "a" is mostly clean and scores high, "b" mostly defective and scores low: overall the
    score looks good, inside each dataset it cannot tell anything (ties: 0.5)."""
    datasets = np.array(["a"] * 10 + ["b"] * 10)
    defect = np.array([""] * 9 + ["spam"] + [""] + ["spam"] * 9, dtype=object)
    by_dataset = np.where(datasets == "a", 1.0, 0.0)
    columns, (row,) = separation_table({"by dataset": by_dataset}, defect, k=5, datasets=datasets)
    assert columns[-2:] == ["auroc_within_datasets", "auroc_worst_dataset"]
    assert row["auroc_all"] == pytest.approx(0.9)  # 81 of 90 clean-vs-defect pairs cross the datasets
    assert row["auroc_within_datasets"] == row["auroc_worst_dataset"] == 0.5
    # a score that is right inside "a" and wrong inside "b"; a dataset with one class only is left out
    inside = np.array([1.0] * 9 + [0.0] + [0.0] + [1.0] * 9)
    assert auroc_within_groups(inside, defect == "", datasets) == {"a": 1.0, "b": 0.0}
    regrouped = np.array(["a"] * 9 + ["c"] + ["b"] * 10)  # "a" all clean, "c" one defect: no pairs
    assert auroc_within_groups(inside, defect == "", regrouped) == {"b": 0.0}


def test_paired_auroc_difference_calls_level_only_within_two_standard_errors():
    """The demo report's verdict against perplexity: the same score is level (difference 0, no spread);
    a score that tells clean rows apart is above a coin flip and the coin flip below it; a score that
    only ranks datasets is below one that is right inside them, within datasets; seeded."""
    rng = np.random.default_rng(0)
    n = 400
    clean = rng.random(n) < 0.7
    datasets = np.where(rng.random(n) < 0.5, "a", "b")
    good = clean + rng.normal(0, 0.5, n)
    coin = rng.random(n)
    same = paired_auroc_difference(good, good, clean, datasets)
    assert same["overall"] == {"difference": 0.0, "standard_error": 0.0, "verdict": "level"}
    better = paired_auroc_difference(good, coin, clean, datasets)
    assert better["overall"]["verdict"] == better["within_groups"]["verdict"] == "above"
    assert better["overall"]["difference"] == pytest.approx(auroc(good, clean) - auroc(coin, clean))
    assert 0 < better["overall"]["standard_error"] < better["overall"]["difference"] / 2
    assert paired_auroc_difference(coin, good, clean, datasets)["overall"]["verdict"] == "below"
    assert paired_auroc_difference(good, coin, clean, datasets, seed=3) == paired_auroc_difference(
        good, coin, clean, datasets, seed=3
    )
    # a nearly identical score (a tiny shuffle of a few rows) is level, not above or below
    nudged = good.copy()
    nudged[:4] = nudged[:4][::-1]
    assert paired_auroc_difference(nudged, good, clean, datasets)["overall"]["verdict"] == "level"
    # dataset "a" mostly clean: ranking "a" above "b" looks good overall, tells nothing inside them
    clean_by_dataset = np.where(datasets == "a", rng.random(n) < 0.9, rng.random(n) < 0.3)
    by_dataset = (datasets == "a").astype(float)
    inside = clean_by_dataset + rng.normal(0, 0.5, n)
    versus = paired_auroc_difference(by_dataset, inside, clean_by_dataset, datasets)
    assert versus["within_groups"]["verdict"] == "below"
    assert versus["within_groups"]["difference"] == pytest.approx(
        0.5 - np.mean(list(auroc_within_groups(inside, clean_by_dataset, datasets).values()))
    )

"""Selection methods (pure): exact top-k against brute force, quotas, random, threshold, diversity,
similarity."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from selectmoe.config import ScoringSection
from selectmoe.data.template import IGNORE_INDEX
from selectmoe.select.score import (
    NGRAMS_PER_ROW,
    ScorePasses,
    common_ngrams,
    reply_commonness,
    reply_ngrams,
    reply_redundancy,
    row_score,
    score_formula,
    score_of,
    score_terms,
    term_scales,
)
from selectmoe.select.topk import (
    above_dataset_thresholds,
    above_threshold,
    best_kmeans,
    choose_n_clusters,
    cosine_silhouette,
    dataset_quotas,
    dataset_thresholds,
    diversity_select,
    frequent_replies,
    per_dataset_k,
    random_k,
    random_per_dataset_k,
    selection_size,
    similarity_select,
    top_k,
    with_reply_strata,
    without_strata,
)


def score_batches(scores, ids, datasets=None, batch=7, replies=None):
    """Score-file batches; with ``replies``, their ``reply_hash`` column too."""
    datasets = datasets or ["d"] * len(ids)
    table = pa.table({"id": ids, "dataset": datasets, "score": pa.array(scores, pa.float64())})
    if replies is not None:
        table = table.append_column("reply_hash", pa.array(replies, pa.uint64()))
    return [table.slice(i, batch) for i in range(0, len(ids), batch)]


@pytest.mark.parametrize("n", [0, 1, 5, 50, 333])
def test_top_k_equals_brute_force_sort_with_ties(n):
    rng = random.Random(n)
    for k in sorted({0, 1, n // 3, n, n + 5}):
        scores = [rng.choice([0.1, 0.2, 0.5, rng.random()]) for _ in range(n)]  # many ties
        ids = [f"row{rng.randrange(10**6):07d}_{i}" for i in range(n)]
        expected = sorted(zip(scores, ids), key=lambda x: (-x[0], x[1]))[:k]
        got = top_k(score_batches(scores, ids, batch=rng.randint(1, 40)), k)
        got_pairs = list(zip(got["score"].to_pylist(), got["id"].to_pylist())) if got.num_columns else []
        assert got_pairs == expected


def test_selection_size_follows_the_seed_rule():
    assert selection_size(1000, 0.05) == 50
    assert selection_size(10, 0.05) == 1  # never empty when there are rows
    assert selection_size(0, 0.05) == 0
    assert selection_size(1000, 0.05, count=7) == 7


def test_random_selection_is_seeded_and_independent_of_batching():
    ids = [f"id{i}" for i in range(200)]
    scores = list(np.linspace(0, 1, 200))
    a = random_k(score_batches(scores, ids, batch=9), 20, seed=3)["id"].to_pylist()
    b = random_k(score_batches(scores, ids, batch=50), 20, seed=3)["id"].to_pylist()
    c = random_k(score_batches(scores, ids, batch=9), 20, seed=4)["id"].to_pylist()
    assert a == b and a != c
    top = set(top_k(score_batches(scores, ids), 20)["id"].to_pylist())
    assert set(a) != top  # not the best-scored rows


def test_per_dataset_quotas_are_proportional_and_exact():
    quotas = dataset_quotas({"a": 70, "b": 20, "c": 10}, 11, None)
    assert quotas == {"a": 8, "b": 2, "c": 1} and sum(quotas.values()) == 11
    assert dataset_quotas({"a": 70, "b": 20}, 5, {"a": 0.1, "b": 3}) == {"a": 7, "b": 3}
    ids = [f"r{i:03d}" for i in range(100)]
    datasets = ["a"] * 70 + ["b"] * 20 + ["c"] * 10
    scores = list(np.random.default_rng(0).random(100))
    chosen = per_dataset_k(score_batches(scores, ids, datasets), quotas)
    for name, quota in quotas.items():
        mine = [(s, i) for s, i, d in zip(scores, ids, datasets) if d == name]
        expected = {i for _, i in sorted(mine, key=lambda x: (-x[0], x[1]))[:quota]}
        got = {i for i, d in zip(chosen["id"].to_pylist(), chosen["dataset"].to_pylist()) if d == name}
        assert got == expected


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_filtered_random_draws_each_datasets_quota_from_its_better_share(keep):
    """filtered_random: per dataset, the rows at or above its keep-quantile (ties kept), then a seeded
    draw of the dataset's quota among them; the same for any batching, another for another seed."""
    from selectmoe.data.subset import random_key

    rng = np.random.default_rng(7)
    n = 300
    ids = [f"r{i:04d}" for i in rng.permutation(n)]
    datasets = list(rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1]))
    # dataset b's scores sit far below a's: a corpus-wide threshold would drop it whole
    scores = [float(np.round(rng.normal(-5 if d == "b" else 0), 1)) for d in datasets]  # rounded: ties
    by_dataset = {d: np.array([s for s, e in zip(scores, datasets) if e == d]) for d in "abc"}
    thresholds = dataset_thresholds(by_dataset, keep)
    kept = {}
    for d, values in by_dataset.items():
        assert thresholds[d] == np.sort(values)[int(np.floor((1 - keep) * len(values)))]
        kept[d] = [i for i, s, e in zip(ids, scores, datasets) if e == d and s >= thresholds[d]]
        assert len(kept[d]) >= keep * len(values)
    quotas = dataset_quotas({d: len(v) for d, v in by_dataset.items()}, 30, None)
    keys = dict(zip(ids, random_key(11, pa.array(ids)).to_pylist()))
    expected = {d: sorted(kept[d], key=lambda i: (keys[i], i))[: quotas[d]] for d in "abc"}
    for batch in (1, 17, n):
        got = random_per_dataset_k(
            above_dataset_thresholds(score_batches(scores, ids, datasets, batch=batch), thresholds),
            quotas,
            11,
        )
        by = {
            d: sorted(i for i, e in zip(got["id"].to_pylist(), got["dataset"].to_pylist()) if e == d)
            for d in "abc"
        }
        assert by == {d: sorted(v) for d, v in expected.items()}
        assert got["score"].to_pylist() == sorted(got["score"].to_pylist(), reverse=True)  # ranked by score
    other = random_per_dataset_k(
        above_dataset_thresholds(score_batches(scores, ids, datasets), thresholds), quotas, 12
    )
    assert set(other["id"].to_pylist()) != {i for v in expected.values() for i in v}


def test_reply_hash_groups_whole_replies_and_never_ones_truncation_cut():
    """The same whole reply (ending in EOS, id 2 here) under two prompts shares its hash; a reply cut by
    truncation is hashed with its prompt, so two rows cut after the same first tokens do not."""
    from selectmoe.select.score import reply_hash

    i = IGNORE_INDEX
    assert reply_hash([1, 3, 9, 2], [i, i, 9, 2], 2) == reply_hash([5, 9, 2], [i, 9, 2], 2)
    assert reply_hash([1, 3, 9, 2], [i, i, 9, 2], 2) != reply_hash([5, 8, 2], [i, 8, 2], 2)
    assert reply_hash([1, 3, 9, 4], [i, i, 9, 4], 2) != reply_hash([5, 9, 4], [i, 9, 4], 2)  # cut: "9 4..."
    assert reply_hash([1, 3, 9, 2], [i, i, 9, 2], [2, 7]) == reply_hash([5, 9, 2], [i, 9, 2], 2)


def test_frequent_replies_are_those_five_rows_and_one_percent_of_a_dataset_give():
    """selection.strata=reply's strata: a reply is frequent in its dataset when at least 5 of its rows and
    1% of them give it; a reply frequent in one dataset is not in another; strata are undone exactly."""
    datasets = ["quiz"] * 20 + ["chat"] * 1000
    replies = [1] * 7 + [2] * 5 + [3] * 4 + list(range(100, 104)) + [1] * 6 + [2] * 12 + list(range(982))
    assert frequent_replies(datasets, replies) == {("quiz", 1), ("quiz", 2), ("chat", 2)}  # chat's 1: < 1%
    batch = pa.table(
        {"id": [f"r{i}" for i in range(len(replies))], "dataset": datasets, "reply_hash": replies}
    )
    strata = with_reply_strata(batch, frequent_replies(datasets, replies))
    labels = strata["dataset"].to_pylist()
    assert len(set(labels[:7])) == 1 and labels[0] != "quiz" and labels[0].startswith("quiz")
    assert labels[12:20] == ["quiz"] * 8 and labels[20:26] == ["chat"] * 6 and labels[26] != "chat"
    assert without_strata(strata) == batch


def test_filtered_random_over_one_dataset_says_its_cut_is_corpus_wide(capsys):
    """A corpus whose rows share one ``dataset`` gets a corpus-wide cut, which drops a domain the selector
    finds hard with the junk: the manifest's ``filtered_random`` entry and the terminal say so; a corpus
    of two datasets is cut per dataset and says nothing."""
    from selectmoe.config import SelectConfig
    from selectmoe.select.driver import ONE_DATASET_CAUTION, _filtered_random

    cfg = SelectConfig()
    cfg.selection.method = "filtered_random"
    ids = [f"r{i:03d}" for i in range(200)]
    scores = [float(-5 * (i % 4 == 0) + i / 1000) for i in range(200)]  # every 4th row scores far lower
    replies = list(range(200))  # no reply repeats: the reply strata (auto) are the datasets

    def batches(datasets):
        return lambda: score_batches(scores, ids, datasets, replies=replies)

    for datasets, cautioned in ((["web"] * 200, True), (["code", "web", "web", "web"] * 50, False)):
        chosen, info = _filtered_random(cfg, batches(datasets), len(ids), 20, batches(datasets))
        low_rows = sum(int(i[1:]) % 4 == 0 for i in chosen["id"].to_pylist())
        assert ("caution" in info) == cautioned
        assert (ONE_DATASET_CAUTION in capsys.readouterr().err) == cautioned
        # the low-scoring rows: cut whole as one dataset, kept at their share (balance=auto: the corpus's
        # mix) as a dataset of their own
        assert low_rows == (0 if cautioned else 5)
    # with a frequent reply the one dataset is two strata, and its rest is still cut corpus-wide
    replies[::10] = [7] * 20
    chosen, info = _filtered_random(cfg, batches(["web"] * 200), len(ids), 20, batches(["web"] * 200))
    assert "caution" in info and info["frequent_replies_by_dataset"] == {"web": 1}
    cfg.selection.keep_fraction = 1.0  # nothing is cut: nothing to say
    assert "caution" not in _filtered_random(cfg, batches(["web"] * 200), 200, 20, batches(["web"] * 200))[1]


def test_threshold_keeps_the_rows_at_or_above_it_best_first():
    ids = [f"r{i}" for i in range(10)]
    scores = [i / 10 for i in range(10)]
    kept = above_threshold(score_batches(scores, ids, batch=3), 0.7)
    assert kept["id"].to_pylist() == ["r9", "r8", "r7"]


def test_diversity_round_robins_over_clusters_and_restarts_differ():
    rng = np.random.default_rng(0)
    centres = np.eye(4)
    features = np.concatenate([centres[c] + 0.05 * rng.random((25, 4)) for c in range(4)])
    ids = [f"r{i:03d}" for i in range(100)]
    scores = rng.random(100)
    scores[:25] += 10  # cluster 0 holds every top score
    table = pa.table({"id": ids, "dataset": ["d"] * 100, "score": scores, "routing": list(features)})
    chosen, labels = diversity_select(table, 8, n_clusters=4, max_iters=50, seed=0)
    assert len(set(labels)) == 4
    picked = chosen["id"].to_pylist()
    by_cluster = {}
    for i in picked:
        by_cluster.setdefault(labels[ids.index(i)], []).append(i)
    assert sorted(len(v) for v in by_cluster.values()) == [2, 2, 2, 2]  # round robin, not all from cluster 0
    for cluster, members in by_cluster.items():
        ranked = sorted(
            (i for i in ids if labels[ids.index(i)] == cluster), key=lambda i: -scores[ids.index(i)]
        )
        assert members == ranked[:2]  # each cluster gives its best-scored rows first
    # restarts use different seeds: on ambiguous data they can reach different partitions
    blob = rng.random((60, 5))
    blob /= np.linalg.norm(blob, axis=1, keepdims=True)
    partitions = {tuple(best_kmeans(blob, 5, 30, seed, restarts=1)) for seed in range(4)}
    assert len(partitions) > 1


def test_auto_k_picks_the_number_of_clusters_the_routing_features_have():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 4 + 0.5  # three well-separated directions
    features = np.concatenate([c + rng.normal(0, 0.3, size=(40, 8)) for c in centres])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    k, silhouettes = choose_n_clusters(features, (2, 6), max_iters=50, seed=0)
    assert k == 3 and sorted(silhouettes) == [2, 3, 4, 5, 6]
    assert silhouettes[3] == max(silhouettes.values()) > 0.5
    assert choose_n_clusters(features, (2, 6), max_iters=50, seed=0) == (k, silhouettes)  # seeded


def test_cosine_silhouette_matches_a_hand_computed_case():
    # two tight pairs on orthogonal axes: within-pair distance 0, across 1 -> silhouette 1
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert cosine_silhouette(x, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    # a row alone in its cluster counts 0 (scikit-learn's rule)
    assert cosine_silhouette(x[:3], np.array([0, 0, 1])) == pytest.approx(2 / 3)


def test_robust_z_ranking_does_not_follow_a_terms_scale_or_offset():
    """``scoring.combine=robust_z``: a weight means the same whatever each term's spread. Scaling the
    NLL by a constant (a model with sharper or flatter predictions) or shifting the prompt gain leaves
    the ranking as it was; the raw combination's ranking moves with it."""
    rng = np.random.default_rng(0)
    n = 500
    layers = rng.uniform(0.3, 0.7, size=(n, 4))
    nll = rng.normal(2.0, 0.5, n)
    unprompted = nll + rng.normal(0.3, 0.2, n)

    def ranking(nll_values, unprompted_values, combine):
        terms = score_terms(layers, nll_values, unprompted_values)
        scales = term_scales(terms) if combine == "robust_z" else None
        return np.argsort(-row_score(layers, nll_values, 0.5, unprompted_values, 1.0, scales=scales))

    base = ranking(nll, unprompted, "robust_z")
    sharper = ranking(nll * 8, unprompted * 8, "robust_z")  # every NLL x 8: gain x 8 too
    shifted = ranking(nll + 3.0, unprompted + 3.0, "robust_z")
    np.testing.assert_array_equal(base, sharper)
    np.testing.assert_array_equal(base, shifted)
    assert not np.array_equal(ranking(nll, unprompted, "raw"), ranking(nll * 8, unprompted * 8, "raw"))
    # gate_weight 0 (the default preset): the gates do not move a row; a negative weight flips their term
    no_gates = row_score(layers, nll, 1.0, unprompted, 1.0, gate_weight=0.0)
    np.testing.assert_array_equal(
        no_gates, row_score(layers[::-1], nll, 1.0, unprompted, 1.0, gate_weight=0.0)
    )
    np.testing.assert_allclose(row_score(layers, gate_weight=-2.0), -2 * layers.mean(axis=1))


def test_prompt_gain_cap_takes_no_reward_above_the_median_and_keeps_the_penalty_below():
    """``scoring.prompt_gain_cap=median``: min(prompt gain, its median). Rows whose gain is above the
    median rank by NLL alone (a cut-off reply's high per-token gain buys nothing); rows below it lose
    their shortfall; with robust_z the capped term is min(z, 0)."""
    n = 9
    layers = np.full((n, 2), 0.5)
    nll = np.array([2.0, 2.1, 2.2, 2.3, 2.4, 2.0, 2.1, 2.2, 2.3])
    gain = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 2.0, 3.0, 4.0])  # median 0.5
    unprompted = nll + gain
    scales = term_scales(score_terms(layers, nll, unprompted))
    assert scales["prompt_gain"]["median"] == pytest.approx(0.5)
    raw = ScoringSection(gate_weight=0.0, perplexity_weight=1.0, prompt_gain_weight=1.0)
    capped = ScoringSection(
        gate_weight=0.0, perplexity_weight=1.0, prompt_gain_weight=1.0, prompt_gain_cap="median"
    )
    columns = {"layer_scores": layers, "nll": nll, "nll_without_prompt": unprompted}
    np.testing.assert_allclose(score_of(columns, capped, scales), -nll + np.minimum(gain, 0.5))
    # uncapped, the row with the largest gain (and a middling NLL) ranks first; capped, the lowest NLL does
    assert np.argmax(score_of(columns, raw, scales)) == 8
    assert (
        np.argmax(score_of(columns, capped, scales)) in (0, 5)
        and score_of(columns, capped, scales)[5] > score_of(columns, capped, scales)[8]
    )
    # raw combine with the cap: the scales set only the cap, the terms stay in nats
    assert score_formula(capped) == "-1 x NLL + 1 x min(prompt gain, its median)"
    # robust_z: the capped term is the z-score capped at 0
    z_capped = ScoringSection(**{**vars(capped), "combine": "robust_z"})
    z = {
        k: (v - scales[k]["median"]) / scales[k]["scale"]
        for k, v in score_terms(layers, nll, unprompted).items()
    }
    np.testing.assert_allclose(
        score_of(columns, z_capped, scales), -z["nll"] + np.minimum(z["prompt_gain"], 0.0)
    )
    assert score_formula(z_capped) == "-1 x z(NLL) + 1 x z(min(prompt gain, its median))"
    # lower_quartile: the same at the 25th percentile; rows between it and the median keep their gain
    assert scales["prompt_gain"]["lower_quartile"] == pytest.approx(0.3)
    quartile = ScoringSection(**{**vars(capped), "prompt_gain_cap": "lower_quartile"})
    np.testing.assert_allclose(score_of(columns, quartile, scales), -nll + np.minimum(gain, 0.3))
    assert score_of(columns, quartile, scales)[3] < score_of(columns, capped, scales)[3]  # gain 0.4
    assert score_formula(quartile) == "-1 x NLL + 1 x min(prompt gain, its lower quartile)"
    # without the corpus's scales (the raw score stored while scoring) there is no cap to apply
    np.testing.assert_allclose(score_of(columns, capped), -nll + gain)


def test_reply_redundancy_is_a_loop_or_a_restated_request_not_an_answer_copied_from_the_prompt():
    """Counted by hand: prompt ``7 1 2 3 4 8`` (three 4-grams), reply ``1 2 3 4 5 6 5 6 5 6``. Of the ten
    4-grams ending at a reply token the last, ``5 6 5 6``, was earlier in the reply (1/10); of the
    request's three, the reply repeats ``1 2 3 4`` (1/3); the larger counts."""
    prompt, reply = [7, 1, 2, 3, 4, 8], [1, 2, 3, 4, 5, 6, 5, 6, 5, 6]
    labels = [IGNORE_INDEX] * len(prompt) + reply
    assert reply_redundancy(prompt + reply, labels) == pytest.approx(1 / 3)
    assert reply_redundancy(prompt + prompt, [IGNORE_INDEX] * 6 + prompt) == 1.0  # an echo
    assert reply_redundancy([5, 6, 7], [IGNORE_INDEX, 6, 7]) == 0.0  # no 4-gram ends in the reply
    assert reply_redundancy(prompt + [9, 9, 9, 9, 9], [IGNORE_INDEX] * 6 + [9] * 5) == pytest.approx(1 / 5)
    # a multiple-choice answer: the question and four options (17 4-grams), the reply one option's text.
    # Two of its five 4-grams are in the prompt, but it repeats 2 of the request's 17: not redundant
    question, option = list(range(1, 21)), [13, 14, 15, 16, 17]
    assert reply_redundancy(question + option, [IGNORE_INDEX] * 20 + option) == pytest.approx(2 / 17)


def test_redundancy_weight_subtracts_the_share_beyond_its_tolerance_in_every_combine_mode():
    """A share in [0, 1] on any model: ``redundancy_weight`` x its excess over ``redundancy_tolerance``
    comes off the score as measured, also where every other term is a robust z-score."""
    rng = np.random.default_rng(0)
    layers, nll = rng.uniform(0, 1, (20, 2)), rng.uniform(1, 4, 20)
    redundancy = rng.uniform(0, 1, 20)
    columns = {"layer_scores": layers, "nll": nll, "reply_redundancy": redundancy}
    scales = term_scales(score_terms(layers, nll))
    for combine in ("raw", "robust_z"):
        without = ScoringSection(gate_weight=0.0, perplexity_weight=1.0, combine=combine)
        with_term = ScoringSection(**{**vars(without), "redundancy_weight": 2.0})
        np.testing.assert_allclose(
            score_of(columns, with_term, scales), score_of(columns, without, scales) - 2.0 * redundancy
        )
    assert score_formula(with_term) == "-1 x z(NLL) - 2 x reply redundancy"
    # with a tolerance only the share beyond it counts
    tolerant = ScoringSection(**{**vars(with_term), "redundancy_tolerance": 0.4})
    np.testing.assert_allclose(
        score_of(columns, tolerant, scales),
        score_of(columns, without, scales) - 2.0 * np.maximum(redundancy - 0.4, 0.0),
    )
    assert (redundancy < 0.4).any() and (redundancy > 0.4).any()
    assert score_formula(tolerant) == "-1 x z(NLL) - 2 x max(reply redundancy - 0.4, 0)"
    # a weight without its column is an error, not a NaN score
    with pytest.raises(KeyError, match="reply_redundancy"):
        score_of({"layer_scores": layers, "nll": nll}, with_term, scales)
    with pytest.raises(ValueError, match="scoring.redundancy_tolerance=0.4 needs scoring.redundancy_weight"):
        ScorePasses.for_scoring(ScoringSection(redundancy_tolerance=0.4))


def test_reply_commonness_is_the_share_of_the_reply_that_many_rows_share():
    """Real replies through the real tokenizer and chat template: a closing formula appended to a fifth
    of them makes those rows' replies partly shared text (and only theirs), a prompt every row shares
    counts for none, and the same reply under another prompt samples the same n-grams."""
    from selectmoe.data.template import encode_batch
    from selectmoe.demo.tiny import build_tokenizer

    train_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
    lines = (train_dir / "oasst1.jsonl").read_text().splitlines()[:60]
    replies = [json.loads(line)["messages"][-1]["content"] for line in lines]
    closing = (
        " I hope this helps! Let me know if you have any other questions, and good luck with your project."
    )
    closed = set(range(0, 60, 5))
    chats = [
        [
            {"role": "user", "content": "Please answer the question below as well as you can."},
            {"role": "assistant", "content": reply + (closing if i in closed else "")},
        ]
        for i, reply in enumerate(replies)
    ]
    tokenizer = build_tokenizer()
    encoded = encode_batch(chats, tokenizer, max_seq_length=4096)
    ngrams = np.stack([reply_ngrams(e["input_ids"], e["labels"]) for e in encoded])
    assert ngrams.shape == (60, NGRAMS_PER_ROW) and ngrams.dtype == np.uint32
    common = common_ngrams(ngrams, min_share=0.1)  # 12 of 60 rows close alike
    assert len(common) > 0
    commonness = reply_commonness(ngrams, common)
    assert (commonness[sorted(closed)] > 0).all()
    assert (
        commonness[[i for i in range(60) if i not in closed]] == 0
    ).all()  # the shared prompt is not counted
    # a shorter reply holds a larger share of the closing
    lengths = np.array([len(replies[i]) for i in sorted(closed)])
    assert commonness[sorted(closed)][np.argmin(lengths)] > commonness[sorted(closed)][np.argmax(lengths)]
    # the same reply under another prompt: the same sampled n-grams (the sample is of n-grams, not rows)
    other = encode_batch([[{"role": "user", "content": "Hi"}, chats[5][1]]], tokenizer, max_seq_length=4096)
    np.testing.assert_array_equal(reply_ngrams(other[0]["input_ids"], other[0]["labels"]), ngrams[5])
    # an n-gram in fewer rows than the share is not common
    assert len(common_ngrams(ngrams, min_share=0.5)) == 0


def test_commonness_weight_subtracts_the_share_beyond_its_tolerance_and_needs_the_corpus():
    """``commonness_weight`` x the excess of the share over ``commonness_tolerance`` comes off the score
    as measured (a share, never z-scored); the common n-grams are a corpus statistic the caller passes."""
    rng = np.random.default_rng(0)
    layers, nll = rng.uniform(0, 1, (40, 2)), rng.uniform(1, 4, 40)
    ngrams = np.zeros((40, NGRAMS_PER_ROW), dtype=np.uint32)
    ngrams[:, :4] = rng.integers(1000, 2**32, (40, 4))
    ngrams[:20, :2] = [7, 8]  # half the rows share two of their four n-grams
    ngrams[:5, 2:4] = [9, 10]  # and five of them two more
    common = common_ngrams(ngrams, min_share=0.1)
    np.testing.assert_array_equal(common, [7, 8, 9, 10])
    commonness = reply_commonness(ngrams, common)
    np.testing.assert_allclose(commonness, [1.0] * 5 + [0.5] * 15 + [0.0] * 20)
    columns = {"layer_scores": layers, "nll": nll, "reply_ngrams": ngrams}
    scales = term_scales(score_terms(layers, nll))
    for combine in ("raw", "robust_z"):
        without = ScoringSection(gate_weight=0.0, perplexity_weight=1.0, combine=combine)
        tolerant = ScoringSection(**{**vars(without), "commonness_weight": 8.0, "commonness_tolerance": 0.25})
        np.testing.assert_allclose(
            score_of(columns, tolerant, scales, common),
            score_of(columns, without, scales) - 8.0 * np.maximum(commonness - 0.25, 0.0),
        )
    assert score_formula(tolerant) == "-1 x z(NLL) - 8 x max(reply commonness - 0.25, 0)"
    with pytest.raises(ValueError, match="common n-grams"):
        score_of(columns, tolerant, scales)
    with pytest.raises(ValueError, match="scoring.commonness_tolerance=0.25 needs scoring.commonness_weight"):
        ScorePasses.for_scoring(ScoringSection(commonness_tolerance=0.25))
    with pytest.raises(ValueError, match="scoring.common_ngram_share=0.01 needs scoring.commonness_weight"):
        ScorePasses.for_scoring(ScoringSection(common_ngram_share=0.01))
    # a batch the seeded sample or the training-row exclusion emptied (its list column reads as (0, 0))
    assert reply_commonness(np.zeros((0, 0)), common).shape == (0,)
    assert score_of({k: v[:0] for k, v in columns.items()}, tolerant, scales, common).shape == (0,)


def test_prompt_gain_cap_without_a_prompt_gain_term_is_refused():
    with pytest.raises(ValueError, match="scoring.prompt_gain_cap=median needs scoring.prompt_gain_weight"):
        ScorePasses.for_scoring(ScoringSection(prompt_gain_cap="median"))


def test_term_scales_are_the_median_the_lower_quartile_and_the_iqr_over_1_349():
    terms = {"gate": np.arange(1.0, 102.0), "nll": np.full(10, 2.0)}
    scales = term_scales(terms)
    assert scales["gate"] == {"median": 51.0, "scale": pytest.approx(50.0 / 1.349), "lower_quartile": 26.0}
    # no spread: the term is only centred
    assert scales["nll"] == {"median": 2.0, "scale": 1.0, "lower_quartile": 2.0}


def round_robin_brute_force(embeddings: np.ndarray, ids: list[str], targets: dict, k: int) -> list[tuple]:
    """Every similarity at once; each round, each task (name order) takes its best row not yet taken."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    best = {
        task: (unit @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T).max(axis=1).astype(np.float32)
        for task, e in sorted(targets.items())
    }
    taken: list[tuple] = []
    while len(taken) < min(k, len(ids)):
        for task, sims in best.items():
            free = [i for i in range(len(ids)) if ids[i] not in {t[0] for t in taken}]
            if free and len(taken) < k:
                i = min(free, key=lambda j: (-sims[j], ids[j]))
                taken.append((ids[i], task, sims[i]))
    return taken


@pytest.mark.parametrize("n", [1, 30, 200])
def test_similarity_select_equals_brute_force_round_robin_over_tasks(n):
    rng = np.random.default_rng(n)
    ids = [f"row{i:04d}" for i in rng.permutation(n)]
    embeddings = rng.normal(size=(n, 16)).astype(np.float16)
    embeddings[n // 2 :] = embeddings[: n - n // 2]  # duplicated rows: ties broken by id
    targets = {
        "b": rng.normal(size=(3, 16)),
        "a": rng.normal(size=(1, 16)),
        "c": embeddings[:2].astype(float),
    }
    table = pa.table(
        {"id": ids, "dataset": ["d"] * n, "embedding": [list(map(float, e)) for e in embeddings]}
    )
    for k in sorted({1, 2, n // 4 + 1, n, n + 3}):
        batch = int(rng.integers(1, 40))
        got = similarity_select([table.slice(i, batch) for i in range(0, n, batch)], targets, k)
        expected = round_robin_brute_force(embeddings.astype(np.float64), ids, targets, k)
        assert got["id"].to_pylist() == [i for i, _, _ in expected]
        assert got["target_task"].to_pylist() == [t for _, t, _ in expected]
        assert got["score"].to_pylist() == pytest.approx([s for _, _, s in expected])
    # the tasks take turns in name order; a target that is a row finds it first
    assert got["target_task"].to_pylist()[:3] == ["a", "b", "c"][: min(3, n)]
    if n > 2:
        assert got["id"][2].as_py() in {ids[0], ids[1], ids[n // 2], ids[n // 2 + 1]}
        assert got["score"][2].as_py() == pytest.approx(1.0)


def test_the_combiner_uses_the_reply_redundancy_where_it_marks_the_corpus_rows():
    """Corpus rows of which a third repeat their prompt (redundancy near 1) against trusted rows that
    never do: the reply redundancy is a feature, its coefficient is negative, and it is read back from
    the score files' column."""
    from selectmoe.select.calibrate import combiner_columns, combiner_score, feature_matrix, fit_combiner

    rng = np.random.default_rng(5)

    def rows(n, looped_share):
        looped = rng.random(n) < looped_share
        return {
            "layer_scores": rng.uniform(0.3, 0.7, size=(n, 2)),
            "nll": rng.normal(2.0, 0.5, n),
            "n_scored_tokens": rng.integers(5, 200, n),
            "reply_redundancy": np.where(looped, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.2, n)),
        }

    trusted, corpus = rows(300, 0.0), rows(1500, 1 / 3)
    x, names = feature_matrix(trusted)
    assert names[-1] == "reply_redundancy"
    combiner = fit_combiner(x, feature_matrix(corpus)[0], names, seed=0)
    weights = dict(zip(names, combiner["coefficients"]))
    assert weights["reply_redundancy"] < 0
    assert abs(weights["reply_redundancy"]) == max(abs(w) for w in weights.values())
    assert "reply_redundancy" in combiner_columns(combiner)
    score = combiner_score(combiner, corpus)
    looped = corpus["reply_redundancy"] > 0.5
    assert score[looped].max() < np.median(score[~looped])


def test_calibrated_combiner_finds_the_feature_that_marks_trusted_rows():
    """A synthetic case with a known answer: trusted rows have a lower NLL and the same gates, prompt
    gain and length as the corpus. The combiner puts its largest weight, negative, on the NLL, reaches a
    high cross-validated AUROC, ranks rows the same when a feature's unit changes, and its stored numbers
    reproduce its scores without scikit-learn."""
    from selectmoe.metrics import auroc
    from selectmoe.select.calibrate import combiner_score, feature_matrix, fit_combiner

    rng = np.random.default_rng(3)

    def rows(n, nll_mean):
        nll = rng.normal(nll_mean, 0.5, n)
        return {
            "layer_scores": rng.uniform(0.3, 0.7, size=(n, 3)),
            "nll": nll,
            "nll_without_prompt": nll + rng.normal(0.4, 0.2, n),
            "n_scored_tokens": rng.integers(5, 200, n),
        }

    trusted, corpus = rows(200, 1.5), rows(2000, 2.5)
    x_trusted, names = feature_matrix(trusted)
    assert names == [
        "gate_layer_0",
        "gate_layer_1",
        "gate_layer_2",
        "nll",
        "prompt_gain",
        "log_scored_tokens",
    ]
    combiner = fit_combiner(x_trusted, feature_matrix(corpus)[0], names, seed=0)
    weights = dict(zip(names, combiner["coefficients"]))
    assert weights["nll"] < 0 and abs(weights["nll"]) > 3 * max(
        abs(w) for n, w in weights.items() if n != "nll"
    )
    assert combiner["cv_auroc"] > 0.85 and len(combiner["cv_auroc_folds"]) == 5
    fresh_trusted, fresh_corpus = rows(100, 1.5), rows(100, 2.5)
    both = {k: np.concatenate([fresh_trusted[k], fresh_corpus[k]]) for k in fresh_trusted}
    score = combiner_score(combiner, both)
    assert auroc(score, np.arange(200) < 100) > 0.85  # holds on rows it was not fitted on
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([x_trusted, feature_matrix(corpus)[0]])
    y = np.r_[np.ones(200), np.zeros(2000)]
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)).fit(
        x, y
    )
    np.testing.assert_allclose(score, model.decision_function(feature_matrix(both)[0]), rtol=1e-6, atol=1e-6)
    rescaled = {
        **trusted,
        "nll": trusted["nll"] * 10,
        "nll_without_prompt": trusted["nll_without_prompt"] * 10,
    }
    rescaled_corpus = {
        **corpus,
        "nll": corpus["nll"] * 10,
        "nll_without_prompt": corpus["nll_without_prompt"] * 10,
    }
    refit = fit_combiner(feature_matrix(rescaled)[0], feature_matrix(rescaled_corpus)[0], names, seed=0)
    both10 = {**both, "nll": both["nll"] * 10, "nll_without_prompt": both["nll_without_prompt"] * 10}
    np.testing.assert_array_equal(np.argsort(combiner_score(refit, both10)), np.argsort(score))


def test_the_demo_report_scores_rows_with_the_gate_weight_the_trusted_set_signed(tmp_path):
    """A run whose trusted set flipped the gate term: the report's "Select-MoE score" column is the score
    the rows were selected by (the signed weight), not the configured one."""
    from selectmoe.demo.run import _selection_score

    rows = [
        {"layer_scores": [0.2, 0.4], "nll": 2.0, "reply_redundancy": 0.0},
        {"layer_scores": [0.9, 0.7], "nll": 2.0, "reply_redundancy": 0.0},
    ]
    config = {"scoring": {"gate_weight": 1.0, "perplexity_weight": 0.5}}
    signed = {"config": config, "metrics": {"gate_sign": {"gate_weight": -1.0}}}
    np.testing.assert_allclose(_selection_score(tmp_path, signed, rows), [-0.3 - 1.0, -0.8 - 1.0])
    unsigned = {"config": config, "metrics": {}}
    np.testing.assert_allclose(_selection_score(tmp_path, unsigned, rows), [0.3 - 1.0, 0.8 - 1.0])

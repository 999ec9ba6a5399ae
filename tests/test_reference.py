"""Stage 1 against a trusted reference set (``training.reference_data``): the gates learn to tell the
reference rows from the corpus, and the ids stage 2 excludes are the corpus rows only."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from selectmoe.config import ConfigError, parse_config
from selectmoe.data.ledger import RowLedger
from selectmoe.demo.corpus import write_demo_corpus
from selectmoe.layout import TRAINING_IDS
from selectmoe.pretrain import pretrain
from selectmoe.pretrain.driver import _reference_holdout, probe_verdict
from selectmoe.ray_data import RowsRead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def reference_config(tiny_olmoe, corpus, reference, out, **extra):
    values = {
        "selector_model.path": str(tiny_olmoe),
        "output_dir": str(out),
        "dataset.data_path": f"[{corpus / 'train'}]",
        "dataset.subset_ratio": 0.5,
        "dataset.max_sequence_length": 128,
        "training.reference_data": f"[{reference}]",
        "training.quality_loss_weight": 0,
        "training.learning_rate": 3e-2,
        "training.batch_size": 16,
        "training.per_device_batch_size": 8,
        "training.max_steps": 24,
        "training.gradient_checkpointing": False,
        "training.checkpoint_every_steps": 0,
        "training.probe_labels": str(corpus / "labels.jsonl"),
        "training.probe_rows": 128,
        "training.probe_every_steps": 24,
        "scaling.num_workers": 1,
        **extra,
    }
    return parse_config("pretrain", overrides=[f"{k}={v}" for k, v in values.items()])


def test_reference_gates_learn_to_tell_trusted_rows_from_the_corpus(ray_session, tiny_olmoe, tmp_path):
    corpus = write_demo_corpus(tmp_path / "corpus", seed=0, n_rows=400, eval_questions=2)
    reference = write_demo_corpus(
        tmp_path / "reference", seed=1, n_rows=160, defect_rate=0.0, eval_questions=2
    )
    out = pretrain(reference_config(tiny_olmoe, corpus, reference / "train", tmp_path / "stage1"))

    corpus_ids = {json.loads(line)["id"] for line in (corpus / "labels.jsonl").read_text().splitlines()}
    trained = pq.read_table(out / TRAINING_IDS)["id"].to_pylist()
    assert (
        trained and set(trained) <= corpus_ids
    )  # stage 2 excludes corpus rows; reference rows are not in it
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    held_out = counts["reference_rows_held_out"]  # training.reference_holdout=0.2 of the 160, by id hash
    assert 16 <= held_out <= 48 and counts["reference_rows_trained"] == 160 - held_out
    assert counts["rows_trained"] == len(trained) + 160 - held_out
    assert not (out / ".rows").exists() and not (out / ".trusted_rows").exists()  # scratch removed

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["reference_loss"] for m in history]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6  # the discriminator learns
    # clean corpus rows not trained on now score above defective ones (planted defects, labels unseen)
    assert history[0]["probe_auroc"] < history[-1]["probe_auroc"]
    assert history[-1]["probe_auroc"] > 0.6
    # trusted rows it never trained on move above corpus rows it never trained on (from 0.45 to 0.52
    # here: the corpus's 70% clean rows look like the trusted ones, which caps this AUROC near 0.65)
    assert history[0]["probe_reference_auroc"] < history[-1]["probe_reference_auroc"]
    assert history[-1]["probe_reference_auroc"] > 0.5
    # labels, when given, decide the verdict the manifest states
    assert manifest["metrics"]["gate_direction_from"] == "labelled probe rows"


def test_no_reference_row_is_held_out_when_stage_1_trains_on_every_corpus_row(tiny_olmoe, tmp_path):
    """With nothing left untrained to rank them against, held-out reference rows would only be lost."""
    ledger = RowLedger()
    ledger.add_counts(Counter(a=10), Counter(a=10), Counter(), 0)  # every accepted row in the subset
    read = RowsRead(rows=None, ledger=ledger, sources=[], outside_subset=None, rows_not_done=None)
    cfg = reference_config(tiny_olmoe, tmp_path, tmp_path / "ref.jsonl", tmp_path / "out")
    assert cfg.training.reference_holdout == 0.2 and _reference_holdout(cfg, read) == 0.0
    ledger.add_counts(Counter(a=5), Counter(), Counter(), 0)  # five rows stage 1 does not train on
    assert _reference_holdout(cfg, read) == 0.2


def test_the_gate_verdict_names_what_it_was_checked_on():
    trusted = probe_verdict({"probe_reference_auroc": 0.25})
    assert trusted["gate_quality_correlation"] == -0.5
    assert trusted["gate_direction_from"] == "held-out trusted rows vs corpus rows"
    assert trusted["gate_direction"] == "inverted: the gates rank corpus rows above held-out trusted rows"
    both = probe_verdict({"probe_auroc": 0.9, "probe_reference_auroc": 0.25})
    assert both["gate_direction"] == "aligned: the gates rank clean rows above defective ones"
    assert probe_verdict({"probe_auroc": float("nan")}) == {} and probe_verdict({"lm_loss": 1.0}) == {}


def test_reference_data_without_valid_rows_is_a_clear_error(ray_session, tiny_olmoe, tmp_path):
    corpus = write_demo_corpus(tmp_path / "corpus", seed=0, n_rows=40, eval_questions=2)
    empty = tmp_path / "reference.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    cfg = reference_config(
        tiny_olmoe, corpus, empty, tmp_path / "stage1", **{"training.probe_labels": "null"}
    )
    with pytest.raises(ConfigError, match="training.reference_data=.*no valid row"):
        pretrain(cfg)
    assert not (tmp_path / "stage1" / ".rows").exists()  # a failed run removes its scratch too

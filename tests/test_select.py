"""Stage 2 on Ray Data: scores independent of batching, exact and reproducible selections, resume,
a killed scoring actor, training-row exclusion, counts that add up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from transformers import OlmoeConfig

from selectmoe.config import ConfigError, DatasetConfig, ScoringSection, parse_config
from selectmoe.data import RowLedger, iter_rows
from selectmoe.data.collate import collate
from selectmoe.data.rejects import DataError
from selectmoe.data.template import (
    encode_messages,
    encode_replies_alone,
    ensure_pad_token,
    load_tokenizer,
)
from selectmoe.layout import ROWS_SCRATCH
from selectmoe.models.loading import load_select_moe, weight_bytes
from selectmoe.models.modeling import gates_shifted
from selectmoe.select import select
from selectmoe.select.driver import cpu_pool_size, scoring_actor_bytes
from selectmoe.select.score import (
    DRIVING_FORCE_TAU,
    common_ngrams,
    driving_force,
    gate_derivatives,
    reply_commonness,
    row_nll,
    score_mask,
    score_terms,
    term_scales,
)
from selectmoe.select.scorer import GateScorer

TRAIN_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Real rows (every other row of two datasets, ~380) split into 6 files, so the scoring pool gets
    several blocks to spread over actors."""
    folder = tmp_path_factory.mktemp("rows")
    lines = []
    for name in ("oasst1.jsonl", "human_instructions.jsonl"):
        lines += (TRAIN_DIR / name).read_text().splitlines()[::2]
    for part in range(6):
        (folder / f"part{part}.jsonl").write_text("\n".join(lines[part::6]) + "\n")
    return folder


def select_overrides(model: Path, out: Path, **extra) -> list[str]:
    values = {
        "selector_model.path": str(model),
        "output_dir": str(out),
        "dataset.max_sequence_length": 128,
        "selection_percentage": 0.1,
        "scoring.sort_window": 64,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_select(model, out, sources, **extra) -> Path:
    extra.setdefault("dataset.data_path", str(sources))
    return select(parse_config("select", overrides=select_overrides(model, out, **extra)))


def scores_by_id(out: Path) -> dict[str, float]:
    table = pq.read_table(out / "scores", columns=["id", "score"])
    return dict(zip(table["id"].to_pylist(), table["score"].to_pylist()))


# ---------------------------------------------------------------------------- the scorer, no Ray


def test_row_score_does_not_depend_on_batch_neighbours(tiny_olmoe):
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows = [json.loads(line) for line in (TRAIN_DIR / "oasst1.jsonl").read_text().splitlines()[:6]]
    encoded = [encode_messages(r["messages"], tokenizer, max_seq_length=96) for r in rows]
    scorer = GateScorer(
        str(tiny_olmoe),
        scoring=ScoringSection(),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        max_rows=4,
    )

    def batch(indices):
        return {
            "id": np.array([rows[i]["id"] for i in indices]),
            "dataset": np.array(["oasst1"] * len(indices)),
            "input_ids": [encoded[i]["input_ids"] for i in indices],
            "labels": [encoded[i]["labels"] for i in indices],
        }

    together = scorer(batch(range(6)))
    for i in range(6):
        alone = scorer(batch([i]))
        np.testing.assert_allclose(alone["score"][0], together["score"][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            alone["layer_scores"][0], together["layer_scores"][i], rtol=1e-5, atol=1e-6
        )
    assert together["n_scored_tokens"].min() > 0
    assert (together["n_scored_tokens"] < together["n_tokens"]).all()  # assistant tokens only


def test_sub_batches_hold_at_most_the_devices_default_rows(tiny_olmoe):
    """``data_process.batch_size=0`` (the default): 32 rows per sub-batch on CPU (128 on a GPU)."""
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    cfg = parse_config("select", overrides=[f"model_checkpoint_path={tiny_olmoe}"])
    scorer = GateScorer(
        str(tiny_olmoe),
        scoring=ScoringSection(),
        pad_token_id=tokenizer.pad_token_id,
        max_rows=cfg.data_process.batch_size,
    )
    lengths = np.full(70, 10)
    expected = [32, 32, 6] if scorer.device.type == "cpu" else [70]
    assert [len(c) for c in scorer._chunks(np.arange(70), lengths)] == expected


def oasst1_rows(tokenizer, n: int = 5) -> tuple[list[dict], list[dict]]:
    """The first ``n`` real oasst1 rows and their encodings."""
    rows = [json.loads(line) for line in (TRAIN_DIR / "oasst1.jsonl").read_text().splitlines()[:n]]
    return rows, [encode_messages(r["messages"], tokenizer, max_seq_length=96) for r in rows]


def oasst1_rows_and_replies(tokenizer) -> tuple[list[dict], list[dict], list[dict]]:
    """``oasst1_rows`` and the replies alone, cut to the same reply tokens (the prompt gain's input)."""
    rows, encoded = oasst1_rows(tokenizer)
    replies = encode_replies_alone(
        [r["messages"] for r in rows],
        tokenizer,
        max_seq_length=96,
        n_assistant_tokens=[e["n_assistant_tokens"] for e in encoded],
    )
    return rows, encoded, replies


def scorer_batch(rows: list[dict], encoded: list[dict], replies: list[dict] | None = None) -> dict:
    """A ``GateScorer`` input batch, with the replies-alone columns when ``replies`` are given."""
    batch = {
        "id": np.array([r["id"] for r in rows]),
        "dataset": np.array(["oasst1"] * len(rows)),
        "input_ids": [e["input_ids"] for e in encoded],
        "labels": [e["labels"] for e in encoded],
    }
    if replies:
        batch.update(
            reply_input_ids=[e["input_ids"] for e in replies], reply_labels=[e["labels"] for e in replies]
        )
    return batch


def test_perplexity_weight_subtracts_the_rows_nll_from_the_same_pass(tiny_olmoe):
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded = oasst1_rows(tokenizer)
    batch = scorer_batch(rows, encoded)
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32"}
    plain = GateScorer(str(tiny_olmoe), scoring=ScoringSection(lm_loss=True), **kwargs)(batch)
    weighted = GateScorer(str(tiny_olmoe), scoring=ScoringSection(perplexity_weight=0.1), **kwargs)(
        batch
    )  # implies lm_loss
    np.testing.assert_allclose(weighted["nll"], plain["nll"], rtol=1e-6)
    assert (plain["nll"] > 0).all()
    np.testing.assert_allclose(weighted["score"], plain["score"] - 0.1 * plain["nll"], rtol=1e-6)


def test_every_score_file_row_has_its_reply_redundancy_and_its_weight_ranks_echoes_down(tiny_olmoe):
    """``reply_redundancy`` is stored whatever the weights (no model needed); an echoed request and a
    looped reply score high on it, real replies low, and ``redundancy_weight`` subtracts it."""
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded = oasst1_rows(tokenizer)
    request = "Name three rivers of Europe and say which of them is the longest."
    for row_id, reply in (("echo", request), ("looped", "The Danube is long. " * 6)):
        rows.append(
            {
                "id": row_id,
                "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}],
            }
        )
        encoded.append(encode_messages(rows[-1]["messages"], tokenizer, max_seq_length=96))
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32"}
    plain = GateScorer(str(tiny_olmoe), scoring=ScoringSection(), **kwargs)(scorer_batch(rows, encoded))
    weighted = GateScorer(str(tiny_olmoe), scoring=ScoringSection(redundancy_weight=2.0), **kwargs)(
        scorer_batch(rows, encoded)
    )
    redundancy = plain["reply_redundancy"]
    np.testing.assert_allclose(weighted["reply_redundancy"], redundancy)
    # the echo repeats every n-gram of its request's text, which the role headers' n-grams dilute (0.56 here)
    assert redundancy[-2] > 0.5 and redundancy[-1] > 0.6 and redundancy[:-2].max() < 0.3
    np.testing.assert_allclose(weighted["score"], plain["score"] - 2.0 * redundancy, rtol=1e-6)


def test_row_nll_in_chunks_equals_the_full_models_loss(tiny_olmoe):
    """``row_nll`` runs the LM head over the scored positions ``NLL_CHUNK`` at a time (bounded memory at
    a real vocabulary); over more positions than one chunk it equals the full model's per-row loss."""
    from selectmoe.models.loading import load_select_moe
    from selectmoe.select.score import NLL_CHUNK

    model = load_select_moe(str(tiny_olmoe), dtype="float32").eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, NLL_CHUNK // 2 + 7), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -20:] = False  # a shorter row
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = row_nll(model, hidden, ids, mask)
        logits = model.lm_head(hidden)[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    targets = mask[:, 1:].float()
    expected = (losses * targets).sum(1) / targets.sum(1)
    assert int(targets.sum()) > NLL_CHUNK
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompt_gain_compares_the_reply_with_and_without_its_prompt(tiny_olmoe):
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded, replies = oasst1_rows_and_replies(tokenizer)

    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32"}
    plain = GateScorer(str(tiny_olmoe), scoring=ScoringSection(lm_loss=True), **kwargs)(
        scorer_batch(rows, encoded)
    )
    gained = GateScorer(str(tiny_olmoe), scoring=ScoringSection(prompt_gain_weight=0.5), **kwargs)(
        scorer_batch(rows, encoded, replies)
    )
    # the unprompted NLL is the NLL the same model gives the replies-alone rows as its input
    unprompted = GateScorer(str(tiny_olmoe), scoring=ScoringSection(lm_loss=True), **kwargs)(
        scorer_batch(rows, replies)
    )
    np.testing.assert_allclose(gained["nll_without_prompt"], unprompted["nll"], rtol=1e-5)
    np.testing.assert_allclose(gained["nll"], plain["nll"], rtol=1e-6)
    gain = unprompted["nll"] - plain["nll"]
    assert np.abs(gain).max() > 0
    np.testing.assert_allclose(gained["score"], plain["score"] + 0.5 * gain, rtol=1e-5)
    with pytest.raises(ValueError, match="scoring.tokens=assistant"):
        GateScorer(str(tiny_olmoe), scoring=ScoringSection(prompt_gain=True, tokens="all"), **kwargs)


def test_the_reply_only_pass_is_batched_by_the_replies_own_length(tiny_olmoe):
    """Sub-batches cut by the full rows' length padded each reply to the longest reply beside it; the
    reply-only pass sorts and cuts the window again by reply length, with the same per-row values."""
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows = [  # prompt lengths that do not follow the reply lengths
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": "Tell me about rivers. " * (1 + 5 * i)},
                {"role": "assistant", "content": "Rivers flow to the sea. " * (1 + 3 * ((3 * i) % 8))},
            ],
        }
        for i in range(8)
    ]
    encoded = [encode_messages(r["messages"], tokenizer, max_seq_length=512) for r in rows]
    replies = encode_replies_alone(
        [r["messages"] for r in rows],
        tokenizer,
        max_seq_length=512,
        n_assistant_tokens=[e["n_assistant_tokens"] for e in encoded],
    )
    scoring = ScoringSection(prompt_gain_weight=0.5)
    scorer = GateScorer(
        str(tiny_olmoe), scoring=scoring, pad_token_id=tokenizer.pad_token_id, dtype="float32", max_rows=2
    )
    reply_shapes = []

    def record(module, args, kwargs):
        if "output_router_logits" not in kwargs:  # the reply-only pass
            reply_shapes.append(tuple(kwargs["input_ids"].shape))

    handle = scorer.model.model.register_forward_pre_hook(record, with_kwargs=True)
    together = scorer(scorer_batch(rows, encoded, replies))
    handle.remove()

    def padded(lengths, order):
        chunks = [order[i : i + 2] for i in range(0, len(order), 2)]
        return sum(len(c) * max(lengths[j] for j in c) for c in chunks)

    reply_lengths = [len(r["input_ids"]) for r in replies]
    by_reply = padded(reply_lengths, sorted(range(8), key=lambda i: reply_lengths[i]))
    by_full = padded(reply_lengths, sorted(range(8), key=lambda i: len(encoded[i]["input_ids"])))
    assert sum(b * t for b, t in reply_shapes) == by_reply < by_full
    for i in range(8):
        alone = scorer(scorer_batch(rows[i : i + 1], encoded[i : i + 1], replies[i : i + 1]))
        np.testing.assert_allclose(
            alone["nll_without_prompt"][0], together["nll_without_prompt"][i], rtol=1e-5
        )
        np.testing.assert_allclose(alone["score"][0], together["score"][i], rtol=1e-5)


@torch.inference_mode()
def test_embeddings_come_from_the_scoring_pass_itself(tiny_olmoe):
    """``scoring.store_embeddings`` adds no forward: the same decoder calls over the same rows, the same
    scores, and each row's embedding is the position-weighted mean of its own last hidden state."""
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded = oasst1_rows(tokenizer, n=5)
    batch = scorer_batch(rows, encoded)
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32", "max_rows": 2}
    results, forwards = {}, {}
    for name, scoring in (("plain", ScoringSection()), ("embedded", ScoringSection(store_embeddings=True))):
        scorer = GateScorer(str(tiny_olmoe), scoring=scoring, **kwargs)
        shapes = []
        handle = scorer.model.model.register_forward_pre_hook(
            lambda module, args, kw, shapes=shapes: shapes.append(tuple(kw["input_ids"].shape)),
            with_kwargs=True,
        )
        results[name] = scorer(batch)
        handle.remove()
        forwards[name] = shapes
    assert forwards["embedded"] == forwards["plain"] and sum(b for b, _ in forwards["plain"]) == len(rows)
    np.testing.assert_array_equal(results["embedded"]["score"], results["plain"]["score"])
    model = scorer.model
    embeddings = results["embedded"]["embedding"]
    assert embeddings[0].dtype == np.float16 and embeddings[0].shape == (model.config.hidden_size,)
    for i, e in enumerate(encoded):
        hidden = model.model(input_ids=torch.as_tensor([list(e["input_ids"])])).last_hidden_state[0]
        weights = torch.arange(1, hidden.shape[0] + 1, dtype=torch.float32)[:, None]
        expected = (weights * hidden).sum(0) / weights.sum()
        np.testing.assert_allclose(embeddings[i].astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)


@torch.inference_mode()
def test_expert_effect_is_the_nll_the_row_loses_without_the_experts(tiny_olmoe, tmp_path):
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded = oasst1_rows(tokenizer)
    batch = scorer_batch(rows, encoded)
    model = load_select_moe(str(tiny_olmoe), dtype="float32").eval()
    for layer in model.model.layers:  # experts that matter: a random tiny model's barely move the loss
        for param in layer.mlp.experts.parameters():
            param.mul_(100.0)
    model.save_pretrained(tmp_path / "model")
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32"}
    plain = GateScorer(str(tmp_path / "model"), scoring=ScoringSection(lm_loss=True), **kwargs)(batch)
    effect = GateScorer(str(tmp_path / "model"), scoring=ScoringSection(expert_effect_weight=0.5), **kwargs)(
        batch
    )
    # gates shut with the zero trash expert = the same model with experts that output nothing
    for layer in model.model.layers:
        for param in layer.mlp.experts.parameters():
            param.zero_()
    tensors = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    hidden = model.model(
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
    ).last_hidden_state
    mask = score_mask(tensors["attention_mask"], tensors["labels"], "assistant")
    expected = row_nll(model, hidden, tensors["input_ids"], mask).numpy()
    np.testing.assert_allclose(effect["nll_gates_shut"], expected, rtol=1e-5)
    np.testing.assert_allclose(effect["nll"], plain["nll"], rtol=1e-6)
    gain = expected - plain["nll"]
    assert np.abs(gain).min() > 1e-3  # ten times the tolerance above (NLL ~10, rtol 1e-5)
    np.testing.assert_allclose(effect["score"], plain["score"] + 0.5 * gain, rtol=1e-5)


def stage1_folder_by_hand(base: Path, out: Path, peft_mode: str) -> Path:
    """A stage-1 output folder over ``base`` whose routers are far from the base's and whose gates mix
    in the (zero) trash expert unevenly: a trained model whose NLL is not its base's. ``full_rank``
    writes the tensors, ``lora`` an adapter on the routers with the gates as modules to save."""
    from selectmoe.layout import ADAPTER_DIR, ROUTER_WEIGHTS, STAGE1_CONFIG
    from selectmoe.pretrain.worker import setup_trainable

    model = load_select_moe(str(base), dtype="float32")
    generator = torch.Generator().manual_seed(1)
    out.mkdir(parents=True)
    if peft_mode == "full_rank":
        tensors = {}
        for i, layer in enumerate(model.model.layers):
            tensors[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(
                layer.mlp.gate.weight.shape, generator=generator
            )
            gate = layer.mlp.quality_gate.weight
            tensors[f"model.layers.{i}.mlp.quality_gate.weight"] = 5 * torch.randn(
                gate.shape, generator=generator
            )
        save_file(tensors, str(out / ROUTER_WEIGHTS))
    else:
        adapted = setup_trainable(model, "lora", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name or "quality_gate" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
        adapted.save_pretrained(str(out / ADAPTER_DIR))
    weights = ROUTER_WEIGHTS if peft_mode == "full_rank" else ADAPTER_DIR
    record = {"base_model": str(base), "peft_mode": peft_mode, "weights": weights}
    (out / STAGE1_CONFIG).write_text(json.dumps({**record, "select_moe": {}, "seed": 0}))
    return out


@torch.inference_mode()
@pytest.mark.parametrize("peft_mode", ["full_rank", "lora"])
def test_nll_model_base_measures_the_nlls_with_the_model_stage1_started_from(tiny_olmoe, tmp_path, peft_mode):
    from transformers import OlmoeForCausalLM

    olmoe = OlmoeForCausalLM.from_pretrained(str(tiny_olmoe), dtype=torch.float32).eval()
    for layer in olmoe.model.layers:  # experts that matter: a random tiny model's barely move the loss
        for param in layer.mlp.experts.parameters():
            param.mul_(100.0)
    olmoe.save_pretrained(tmp_path / "base")
    stage1 = stage1_folder_by_hand(tmp_path / "base", tmp_path / "stage1", peft_mode)
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded, replies = oasst1_rows_and_replies(tokenizer)
    batch = scorer_batch(rows, encoded, replies)
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "dtype": "float32"}
    scoring = {"prompt_gain_weight": 1.0, "perplexity_weight": 1.0, "gate_weight": 0.5}
    trained = GateScorer(str(stage1), scoring=ScoringSection(**scoring), **kwargs)(batch)
    based = GateScorer(str(stage1), scoring=ScoringSection(**scoring, nll_model="base"), **kwargs)(batch)

    def plain_nll(encodings: list[dict]) -> np.ndarray:  # the base checkpoint through plain transformers
        tensors = collate(encodings, tokenizer.pad_token_id, torch.device("cpu"))
        logits = olmoe(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), tensors["input_ids"][:, 1:], reduction="none"
        )
        target = score_mask(tensors["attention_mask"], tensors["labels"], "assistant")[:, 1:].float()
        return ((token * target).sum(1) / target.sum(1)).numpy()

    np.testing.assert_allclose(based["nll"], plain_nll(encoded), rtol=1e-5)
    np.testing.assert_allclose(based["nll_without_prompt"], plain_nll(replies), rtol=1e-5)
    assert np.abs(trained["nll"] - based["nll"]).max() > 1e-2  # stage 1's model is not its base
    # the gates are the trained model's, read in a pass of their own (the base's routers swapped back out)
    np.testing.assert_allclose(np.array(based["layer_scores"]), np.array(trained["layer_scores"]), rtol=1e-6)
    gates = np.array(based["layer_scores"]).mean(1)
    prompt_gain = based["nll_without_prompt"] - based["nll"]
    np.testing.assert_allclose(based["score"], 0.5 * gates - based["nll"] + prompt_gain, rtol=1e-6)
    with pytest.raises(ConfigError, match="scoring.nll_model=base needs an NLL"):
        GateScorer(str(stage1), scoring=ScoringSection(nll_model="base"), **kwargs)


# ---------------------------------------------------------------------------- stage 2 end to end


@pytest.fixture(scope="module")
def one_actor(tiny_olmoe, ray_session, tmp_path_factory, sources):
    return run_select(tiny_olmoe, tmp_path_factory.mktemp("select_1"), sources, **{"scoring.num_actors": 1})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_counts_add_up_and_outputs_are_complete(one_actor, sources):
    manifest = json.loads((one_actor / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["rows_scored"] + counts["rows_rejected"]
    assert counts["rows_selected"] == int(0.1 * counts["rows_scored"])
    rejects = (one_actor / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == counts["rows_rejected"]
    selected = [json.loads(line) for line in (one_actor / "selected.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in selected] == list(range(1, len(selected) + 1))
    scores = [r["score"] for r in selected]
    assert scores == sorted(scores, reverse=True)
    assert set(selected[0]) >= {"dataset", "id", "messages", "score", "rank"}
    # the selection is the exact top of every scored row
    all_scores = scores_by_id(one_actor)
    assert len(all_scores) == counts["rows_scored"]
    best = sorted(all_scores.items(), key=lambda x: (-x[1], x[0]))[: len(selected)]
    assert [r["id"] for r in selected] == [i for i, _ in best]
    table = pq.read_table(one_actor / "scores")
    assert {"layer_scores", "n_tokens", "n_scored_tokens", "dataset"} <= set(table.column_names)
    # a record is its row's fields, then score and rank: one JSON line each, non-ASCII kept as is
    rows = {r["id"]: r for r in iter_rows(DatasetConfig(data_path=[str(sources)]), RowLedger())}
    # each score row says where its row was read (what a resumed run finds the rows scored before by)
    where = zip(*(table[c].to_pylist() for c in ("id", "source", "line")), strict=True)
    assert {i: (s, n) for i, s, n in where} == {i: (rows[i]["source"], rows[i]["line"]) for i in all_scores}
    for line, record in zip((one_actor / "selected.jsonl").read_text().splitlines(), selected):
        row = rows[record["id"]]
        fields = {k: row[k] for k in ("dataset", "id", "messages")} | json.loads(row["extra"])
        assert line == json.dumps(
            {**fields, "score": record["score"], "rank": record["rank"]}, ensure_ascii=False
        )
    assert pq.read_table(one_actor / "selected.parquet").to_pylist() == selected
    assert (one_actor / "score_histograms.png").stat().st_size > 0
    assert not (one_actor / ROWS_SCRATCH).exists()  # the rows the scan wrote were scratch


@pytest.mark.timeout(300)
def test_the_selection_is_written_in_rank_order_with_every_field_of_any_row(
    ray_session, tmp_path, monkeypatch
):
    """Records rendered by Ray tasks into rank-sorted parts (one a block), merged in rounds and parsed
    one at a time into row groups of two: the JSON lines keep each row's own fields; Parquet has every
    field any row has (null elsewhere), typed across batches."""
    from selectmoe.select import output

    monkeypatch.setattr(output, "WRITE_BATCH_ROWS", 2)  # several row groups
    monkeypatch.setattr(output, "PARSE_ROWS", 1)  # each filled from several parsed batches
    extras = [{}, {"source": "web"}, {"lang": "fr", "n": 3}, {}, {"source": None}, {"lang": "日本語"}]
    rows = ray_session.data.from_items(
        [
            {
                "dataset": f"d{i % 2}",
                "id": f"row{i}",
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
                "extra": json.dumps(extra, ensure_ascii=False),
            }
            for i, extra in enumerate(extras)
        ],
        override_num_blocks=3,
    )
    chosen = ["row5", "row1", "row2", "row0", "row4"]  # rank order; row3 is not selected
    selected = pa.table(
        {"id": chosen, "score": [5.0, 4.0, 3.0, 2.0, 1.0], "rank": pa.array(range(1, 6), pa.int64())}
    )
    jsonl, parquet = tmp_path / "selected.jsonl", tmp_path / "selected.parquet"
    monkeypatch.setattr(output, "MERGE_FILES", 2)  # and merged in rounds
    output.write_selection(rows, selected, jsonl, parquet, tmp_path / "parts")
    assert not (tmp_path / "parts").exists()
    expected = []
    for rank, row_id in enumerate(chosen, 1):
        i = int(row_id.removeprefix("row"))
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
        fields = {"dataset": f"d{i % 2}", "id": row_id, "messages": messages, **extras[i]}
        expected.append({**fields, "score": 6.0 - rank, "rank": rank})
    assert jsonl.read_text(encoding="utf-8") == "".join(
        json.dumps(record, ensure_ascii=False) + "\n" for record in expected
    )
    table = pq.read_table(parquet)
    assert table.column_names == ["dataset", "id", "messages", "lang", "score", "rank", "source", "n"]
    assert pq.ParquetFile(parquet).num_row_groups == 3
    columns = table.column_names
    assert table.to_pylist() == [{c: record.get(c) for c in columns} for record in expected]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_actors_and_reruns_give_byte_identical_selections(one_actor, tiny_olmoe, tmp_path, sources):
    two = run_select(tiny_olmoe, tmp_path / "select_2", sources, **{"scoring.num_actors": 2})
    assert (two / "selected.jsonl").read_bytes() == (one_actor / "selected.jsonl").read_bytes()
    assert scores_by_id(two) == scores_by_id(one_actor)


def test_cpu_scoring_actors_are_no_more_than_free_memory_holds_copies_of_the_model(tiny_olmoe, tmp_path):
    loaded = load_select_moe(str(tiny_olmoe), dtype="float32")
    assert weight_bytes(str(tiny_olmoe), "float32") == sum(
        p.numel() * p.element_size() for p in loaded.parameters()
    )
    assert weight_bytes(str(tiny_olmoe), "bfloat16") * 2 == weight_bytes(str(tiny_olmoe), "float32")
    # OLMoE-1B-7B's published shape, config only (no weights): 6.9B parameters
    OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_experts=64, num_experts_per_tok=8,
    ).save_pretrained(tmp_path / "olmoe_1b_7b")  # fmt: skip
    olmoe = str(tmp_path / "olmoe_1b_7b")
    assert 6.85e9 < weight_bytes(olmoe, "bfloat16") / 2 < 6.95e9
    gib = 2**30
    bf16, fp32 = scoring_actor_bytes(olmoe, "bfloat16"), scoring_actor_bytes(olmoe, "float32")
    assert cpu_pool_size(16, 64 * gib, bf16) == 3  # not 15 copies of 13 GiB
    assert cpu_pool_size(16, 64 * gib, fp32) == 1
    assert cpu_pool_size(16, 8 * gib, bf16) == 1  # never none: one actor tries
    tiny = scoring_actor_bytes(str(tiny_olmoe), "float32")
    assert cpu_pool_size(16, 64 * gib, tiny) == 15  # one CPU left for Ray Data
    assert cpu_pool_size(2, 15 * gib, tiny) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_after_a_crash_reuses_scores_and_gives_identical_output(
    one_actor, tiny_olmoe, tmp_path, sources
):
    out = tmp_path / "select_resume"
    shutil.copytree(one_actor, out)
    files = sorted((out / "scores").glob("*.parquet"))
    kept = pq.read_table(files[0], columns=["id"]).num_rows
    # a crash mid-write leaves a truncated file; rerunning must drop it and rescore its rows
    files[0].write_bytes(files[0].read_bytes()[:100])
    rerun = run_select(tiny_olmoe, out, sources, **{"scoring.num_actors": 1})
    assert (rerun / "selected.jsonl").read_bytes() == (one_actor / "selected.jsonl").read_bytes()
    assert scores_by_id(rerun) == scores_by_id(one_actor)  # nothing lost, nothing duplicated
    manifest = json.loads((rerun / "manifest.json").read_text())
    reused = sum(pq.read_metadata(f).num_rows for f in files[1:])
    assert kept > 0 and manifest["counts"]["rows_scored_before"] == reused > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rerun_with_another_method_loads_no_model_and_an_edited_input_is_rescored(
    one_actor, tiny_olmoe, tmp_path, sources, capfd
):
    out = tmp_path / "select_again"
    shutil.copytree(one_actor, out)
    stored = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.parquet")}
    capfd.readouterr()
    run_select(tiny_olmoe, out, sources, **{"selection.method": "random"})
    assert "rows were scored before; scoring skipped" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.parquet")} == stored
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_selected"] == int(0.1 * manifest["counts"]["rows_scored"])

    # a file edited in place (same ids, another reply): its scores are stale, so every row is scored again
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(sources / "part0.jsonl", corpus / "part0.jsonl")
    first = run_select(tiny_olmoe, tmp_path / "select_edit", corpus)
    before = scores_by_id(first)
    rows = [json.loads(line) for line in (corpus / "part0.jsonl").read_text().splitlines()]
    rows[0]["messages"][-1]["content"] = "no"
    (corpus / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = scores_by_id(run_select(tiny_olmoe, tmp_path / "select_edit", corpus))
    assert "scoring skipped" not in capfd.readouterr().err
    assert set(after) == set(before) and after[rows[0]["id"]] != before[rows[0]["id"]]


@pytest.mark.timeout(300)
def test_no_row_to_score_is_an_error_that_names_the_rejects(ray_session, tiny_olmoe, tmp_path, sources):
    """Rows too long for any reply token to survive truncation: not an empty selection but an error
    that says why and where the rejects are."""
    out = tmp_path / "too_short"
    with pytest.raises(DataError, match=r"no row to score: \d+ read, \d+ rejected \(no_assistant_tokens"):
        run_select(tiny_olmoe, out, sources, **{"dataset.max_sequence_length": 8})
    assert not (out / "selected.jsonl").exists() and (out / "rejects.jsonl").read_text()
    assert not (out / ROWS_SCRATCH).exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_scoring_actor_changes_nothing(one_actor, tiny_olmoe, tmp_path, sources):
    out = run_select(tiny_olmoe, tmp_path / "select_kill", sources, **{"scoring.inject_actor_failure": True})
    assert (out / ".injected_actor_failure").exists()
    table = pq.read_table(out / "scores", columns=["id"])
    assert table.num_rows == len(set(table["id"].to_pylist()))  # no duplicates
    assert (out / "selected.jsonl").read_bytes() == (one_actor / "selected.jsonl").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stage1_folder_excludes_training_rows_and_diversity_selects(one_actor, tiny_olmoe, tmp_path, sources):
    # a stage-1 folder: names the base, carries router weights (here the base's own) and training ids
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    base = load_select_moe(str(tiny_olmoe), dtype="float32")
    router = {
        n: p.detach()
        for n, p in base.named_parameters()
        if n.endswith(("mlp.gate.weight", "quality_gate.weight"))
    }
    save_file(router, str(stage1 / "router_weights.safetensors"))
    (stage1 / "select_moe_config.json").write_text(
        json.dumps(
            {
                "base_model": str(tiny_olmoe),
                "tokenizer": str(tiny_olmoe),
                "weights": "router_weights.safetensors",
                "peft_mode": "full_rank",
                "select_moe": {},
                "seed": 0,
            }
        )
    )
    top = [json.loads(line)["id"] for line in (one_actor / "selected.jsonl").read_text().splitlines()]
    import pyarrow as pa

    trained = top[:5] + ["trained-but-not-in-this-corpus"]  # counts for nothing here
    pq.write_table(pa.table({"id": trained, "dataset": ["x"] * 6}), stage1 / "training_ids.parquet")
    out = run_select(
        tiny_olmoe,
        tmp_path / "select_div",
        sources,
        model_checkpoint_path=str(stage1),
        **{"selection.method": "diversity", "scoring.store_routing": True, "clustering_params.k": 3},
    )
    selected = [json.loads(line)["id"] for line in (out / "selected.jsonl").read_text().splitlines()]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert not set(selected) & set(top[:5])
    assert counts["rows_excluded_training"] == 5
    assert len(selected) == int(0.1 * (counts["rows_scored"] - 5))
    assert scores_by_id(out) == scores_by_id(one_actor)  # same weights -> same scores


@pytest.mark.slow
def test_training_rows_are_found_by_hash_bucket_tasks_in_every_file_and_batch(ray_session, tmp_path):
    """The join that leaves stage 1's training rows out of the selection, without a central set: the
    positions found are exactly the rows whose id is a training id, in files of every size (one spans
    two read batches, one is empty) and in several groups of files; ids stage 1 trained on twice, or
    that the corpus does not have, change nothing."""
    from selectmoe.select.training_rows import ID_BATCH_ROWS, find_training_rows

    sizes = [5, ID_BATCH_ROWS + 7, 0, 3, 40, 11]  # 4 buckets on 2 CPUs: 4 groups of these 6 files
    rng = np.random.default_rng(0)
    files, ids_of = [], []
    for index, size in enumerate(sizes):
        ids = [f"f{index}-{row}" for row in range(size)]
        path = tmp_path / "scores" / f"part-{index:03d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "score": rng.random(size)}), path)
        files.append(path)
        ids_of.append(ids)
    corpus = [i for ids in ids_of for i in ids]
    trained = list(rng.choice(corpus, 500, replace=False))
    trained += [f"f1-{ID_BATCH_ROWS + 6}", "f1-0", "f0-4", trained[0], "not-in-this-corpus"]
    pq.write_table(
        pa.table({"id": trained, "dataset": ["x"] * len(trained)}), tmp_path / "training_ids.parquet"
    )

    found = find_training_rows(files, tmp_path / "training_ids.parquet", tmp_path / "scratch")
    assert [list(group) for group in found.groups] == [[0, 1], [2, 3], [4], [5]]
    expected = set(trained) & set(corpus)
    assert found.count() == len(expected)
    for index, ids in enumerate(ids_of):
        rows = found.rows_of(index)
        assert rows.tolist() == [row for row, row_id in enumerate(ids) if row_id in expected], index
        kept = []  # as stage 2 streams the file: in batches, each with its offset
        for offset in range(0, max(len(ids), 1), 1000):
            batch = ids[offset : offset + 1000]
            mask = found.kept(index, offset, len(batch))
            kept += batch if mask is None else [row_id for row_id, keep in zip(batch, mask) if keep]
        assert kept == [row_id for row_id in ids if row_id not in expected], index
    assert find_training_rows(files, None, tmp_path / "none").count() == 0


def test_driving_force_is_a_damped_newton_step_on_the_gates():
    """D2 = max(-A, 0)^2 / (2 (tau + max(B, 0) + 10 max(-B, 0))): nothing where opening the gates raises
    the loss, the Newton decrease A^2 / 2B where the curvature is positive, ten times damped where it is
    negative."""
    slope = np.array([[-0.2, 0.1], [-0.2, -0.2]])
    curvature = np.array([[0.1, 0.1], [-0.1, 0.0]])
    expected = [
        [0.04 / (2 * (DRIVING_FORCE_TAU + 0.1)), 0.0],
        [0.04 / (2 * (DRIVING_FORCE_TAU + 1.0)), 0.04 / (2 * DRIVING_FORCE_TAU)],
    ]
    np.testing.assert_allclose(driving_force(slope, curvature), expected)


def test_gate_derivatives_are_the_nlls_slope_and_curvature_along_opening_a_layers_gates(tiny_olmoe, tmp_path):
    """A and B against central finite differences of an independent float64 NLL, on a model whose
    experts matter (scaled up) and in float64 (eager experts), then GateScorer's stored columns and score."""
    tokenizer = ensure_pad_token(load_tokenizer(str(tiny_olmoe)))
    rows, encoded = oasst1_rows(tokenizer, n=3)
    model = load_select_moe(str(tiny_olmoe), dtype="float32").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for param in layer.mlp.experts.parameters():
                param.mul_(30.0)
    model.save_pretrained(tmp_path / "model")
    exact = model.double()
    exact.set_experts_implementation("eager")
    batch = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    ids, attention = batch["input_ids"], batch["attention_mask"]
    mask = score_mask(attention, batch["labels"], "assistant")
    slope, curvature = gate_derivatives(exact, ids, attention, mask)

    @torch.no_grad()
    def nll(layer: int, e: float) -> np.ndarray:
        shifts = [
            (e if i == layer else 0.0) * attention[..., None].double() for i in range(len(exact.model.layers))
        ]
        with gates_shifted(exact, shifts):
            logits = exact(input_ids=ids, attention_mask=attention).logits[:, :-1]
        token = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        target = mask[:, 1:].double()
        return ((token * target).sum(1) / target.sum(1)).numpy()

    tokens = attention.sum(1).double().numpy()
    h = 1e-2  # smaller steps drown in rounding (the quality gates stay float32)
    for layer in range(len(exact.model.layers)):
        up, mid, down = nll(layer, h), nll(layer, 0.0), nll(layer, -h)
        np.testing.assert_allclose(slope[:, layer], (up - down) / (2 * h) / tokens, rtol=2e-3)
        np.testing.assert_allclose(curvature[:, layer], (up - 2 * mid + down) / h**2 / tokens, rtol=1e-2)
    assert np.abs(slope).min() > 1e-5  # the gates move the loss: not a comparison of zeros

    scorer = GateScorer(
        str(tmp_path / "model"),
        scoring=ScoringSection(driving_force_weight=2.0),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    columns = scorer(scorer_batch(rows, encoded))
    stored = (
        np.array(columns["gate_slope"]),
        np.array(columns["gate_curvature"]),
        np.array(columns["driving_force"]),
    )
    np.testing.assert_allclose(stored[0], slope, rtol=1e-3, atol=1e-7)  # float32 and grouped_mm here
    np.testing.assert_allclose(stored[2], driving_force(stored[0], stored[1]))
    expected = np.array(columns["layer_scores"]).mean(1) + 2.0 * stored[2].mean(1)
    np.testing.assert_allclose(columns["score"], expected)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_weights_that_need_a_pass_rescore_and_other_weights_reuse_the_stored_terms(
    one_actor, tiny_olmoe, tmp_path, sources
):
    out = tmp_path / "select_gain"
    shutil.copytree(one_actor, out)  # scores under another key: not reused
    weights = {"scoring.prompt_gain_weight": 0.5, "scoring.expert_effect_weight": 2.0}
    run_select(tiny_olmoe, out, sources, **weights)
    rows = pq.read_table(out / "scores").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(scores_by_id(one_actor))
    assert all(r["nll"] > 0 and r["nll_without_prompt"] > 0 and r["nll_gates_shut"] > 0 for r in rows)
    weight = json.loads((out / "manifest.json").read_text())["config"]["scoring"]["perplexity_weight"]
    for row in rows:
        expected = np.mean(row["layer_scores"]) - weight * row["nll"]
        expected += 0.5 * (row["nll_without_prompt"] - row["nll"])
        expected += 2.0 * (row["nll_gates_shut"] - row["nll"])
        assert row["score"] == pytest.approx(expected, rel=1e-9, abs=1e-12)

    # scoring.combine=robust_z reuses these scores (it changes how the stored terms combine, not what
    # is computed) and selects by the robust z-scores of the terms over the scored rows
    files = {p.name: p.read_bytes() for p in (out / "scores").glob("*.parquet")}
    run_select(tiny_olmoe, out, sources, **weights, **{"scoring.combine": "robust_z"})
    assert {p.name: p.read_bytes() for p in (out / "scores").glob("*.parquet")} == files
    manifest = json.loads((out / "manifest.json").read_text())
    columns = {
        k: np.array([r[k] for r in rows])
        for k in ("layer_scores", "nll", "nll_without_prompt", "nll_gates_shut")
    }
    terms = score_terms(**columns)
    expected_scales = term_scales(terms)  # over every row: fewer than the sample size
    assert set(manifest["metrics"]["term_scales"]) == set(expected_scales)
    for name, scale in expected_scales.items():
        assert manifest["metrics"]["term_scales"][name] == pytest.approx(scale)
    assert (
        manifest["metrics"]["score_formula"].startswith("z(mean gate) ")
        and "2 x z(expert effect)" in manifest["metrics"]["score_formula"]
    )
    z = {k: (v - term_scales(terms)[k]["median"]) / term_scales(terms)[k]["scale"] for k, v in terms.items()}
    combined = z["gate"] - weight * z["nll"] + 0.5 * z["prompt_gain"] + 2.0 * z["expert_effect"]
    order = sorted(zip(combined, [r["id"] for r in rows]), key=lambda x: (-x[0], x[1]))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in order[: len(selected)]]
    assert [r["score"] for r in selected] == pytest.approx([s for s, _ in order[: len(selected)]])

    # scoring.prompt_gain_cap=median, in nats: the same score files, the prompt gain capped at its median
    # over the scored rows (stored in the manifest), the other terms as measured
    run_select(tiny_olmoe, out, sources, **weights, **{"scoring.prompt_gain_cap": "median"})
    assert {p.name: p.read_bytes() for p in (out / "scores").glob("*.parquet")} == files
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    median = float(np.median(terms["prompt_gain"]))
    assert metrics["term_scales"]["prompt_gain"]["median"] == pytest.approx(median)
    assert "0.5 x min(prompt gain, its median)" in metrics["score_formula"]
    capped = (
        terms["gate"] - weight * terms["nll"] + 0.5 * np.minimum(terms["prompt_gain"], median)
        + 2.0 * terms["expert_effect"]
    )  # fmt: skip
    order = sorted(zip(capped, [r["id"] for r in rows]), key=lambda x: (-x[0], x[1]))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in order[: len(selected)]]
    assert [r["score"] for r in selected] == pytest.approx([s for s, _ in order[: len(selected)]])

    # other weights that turn no pass on or off reuse the score files as well (a sweep over weights scores
    # the corpus once): the selection recomputes every row's score with this run's weights
    other = {
        "scoring.gate_weight": -1.0, "scoring.perplexity_weight": 0.5, "scoring.prompt_gain_weight": 2.0,
        "scoring.expert_effect_weight": -1.0, "scoring.redundancy_weight": 4.0,
        "scoring.redundancy_tolerance": 0.05, "scoring.commonness_weight": 3.0,
    }  # fmt: skip
    manifest = json.loads((run_select(tiny_olmoe, out, sources, **other) / "manifest.json").read_text())
    assert {p.name: p.read_bytes() for p in (out / "scores").glob("*.parquet")} == files
    assert manifest["counts"]["rows_scored_before"] == manifest["counts"]["rows_scored"] == len(rows)
    redundancy = np.array([r["reply_redundancy"] for r in rows])
    assert (redundancy > 0.05).any()  # the redundancy term moves some row
    # the commonness: the share of each reply's sampled 8-grams that 3 or more rows' replies hold (every row
    # is in the sample: fewer than its size), from the stored reply_ngrams
    ngrams = np.array([r["reply_ngrams"] for r in rows], dtype=np.uint32)
    common = common_ngrams(ngrams, 0.001)
    commonness = reply_commonness(ngrams, common)
    assert (commonness > 0).any()  # the commonness term moves some row (oasst1 holds near-duplicate replies)
    assert manifest["metrics"]["common_ngrams"]["count"] == len(common)
    assert manifest["metrics"]["common_ngrams"]["sample_rows"] == len(rows)
    reweighted = (
        -terms["gate"] - 0.5 * terms["nll"] + 2.0 * terms["prompt_gain"] - terms["expert_effect"]
        - 4.0 * np.maximum(redundancy - 0.05, 0) - 3.0 * commonness
    )  # fmt: skip
    order = sorted(zip(reweighted, [r["id"] for r in rows]), key=lambda x: (-x[0], x[1]))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in order[: len(selected)]]
    assert [r["score"] for r in selected] == pytest.approx([s for s, _ in order[: len(selected)]])
    assert manifest["metrics"]["score_formula"].endswith(
        "- 4 x max(reply redundancy - 0.05, 0) - 3 x reply commonness"
    )
    assert json.loads((out / "common_ngrams.json").read_text()) == common.tolist()
    run_select(tiny_olmoe, out, sources, **weights)  # a rerun without the term leaves no stale common set
    assert not (out / "common_ngrams.json").exists()
    # with a capped prompt gain (as the default preset has) the shares stay out of the term scales
    capped_run = run_select(tiny_olmoe, out, sources, **other, **{"scoring.prompt_gain_cap": "median"})
    manifest = json.loads((capped_run / "manifest.json").read_text())
    assert set(manifest["metrics"]["term_scales"]) == {"gate", "nll", "prompt_gain", "expert_effect"}
    capped = reweighted - 2.0 * terms["prompt_gain"] + 2.0 * np.minimum(terms["prompt_gain"], median)
    order = sorted(zip(capped, [r["id"] for r in rows]), key=lambda x: (-x[0], x[1]))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in order[: len(selected)]]

    # weights set to 0 turn their passes off: the files, which hold more, are reused all the same
    off = {**other, "scoring.prompt_gain_weight": 0.0, "scoring.expert_effect_weight": 0.0}
    manifest = json.loads((run_select(tiny_olmoe, out, sources, **off) / "manifest.json").read_text())
    assert {p.name: p.read_bytes() for p in (out / "scores").glob("*.parquet")} == files
    assert manifest["counts"]["rows_scored_before"] == len(rows)
    fewer = -terms["gate"] - 0.5 * terms["nll"] - 4.0 * np.maximum(redundancy - 0.05, 0) - 3.0 * commonness
    order = sorted(zip(fewer, [r["id"] for r in rows]), key=lambda x: (-x[0], x[1]))
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in order[: len(selected)]]
    # ... but only when every row was scored: rows left are scored, every row again, with the passes asked
    sorted((out / "scores").glob("*.parquet"))[0].unlink()
    manifest = json.loads((run_select(tiny_olmoe, out, sources, **off) / "manifest.json").read_text())
    assert manifest["counts"]["rows_scored_before"] == 0 and manifest["counts"]["rows_scored"] == len(rows)
    assert "nll_without_prompt" not in pq.read_schema(sorted((out / "scores").glob("*.parquet"))[0]).names


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_similarity_picks_rows_by_cosine_to_each_tasks_examples_in_turns(
    one_actor, tiny_olmoe, tmp_path, sources
):
    """selection.method=similarity (RDS+): target examples in two formats, a task per file and per
    field; a target that is a corpus row finds that row first; the selection is the round-robin over
    the stored embeddings; reruns with another actor count give the same bytes."""
    from selectmoe.select.topk import similarity_select

    scored = set(scores_by_id(one_actor))
    corpus = [
        json.loads(line) for path in sorted(sources.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    chat = [r for r in corpus if r["dataset"] == "oasst1" and r["id"] in scored][:2]
    howto = [
        r
        for r in corpus
        if r["dataset"] == "human_instructions" and r["id"] in scored and len(r["messages"]) == 2
    ][:2]
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "chat.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "messages": r["messages"]}) + "\n" for i, r in enumerate(chat))
    )
    (targets / "mixed.jsonl").write_text(  # Alpaca rows whose task is a field
        "".join(
            json.dumps(
                {
                    "instruction": r["messages"][0]["content"],
                    "output": r["messages"][1]["content"],
                    "task": "howto",
                }
            )
            + "\n"
            for r in howto
        )
        + "not json\n"
    )
    keys = {
        "selection.method": "similarity",
        "selection.targets": f"[{targets}]",
        "scoring.store_embeddings": True,
        "scoring.num_actors": 1,
    }
    out = run_select(tiny_olmoe, tmp_path / "similar", sources, **keys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["similarity"]["target_examples"] == {"chat": 2, "howto": 2}
    assert len((out / "target_rejects.jsonl").read_text().splitlines()) == 1  # the bad line, not lost
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == manifest["counts"]["rows_selected"] == int(0.1 * len(scored))
    assert [r["target_task"] for r in selected[:4]] == ["chat", "howto", "chat", "howto"]
    assert {r["id"] for r in selected[0:3:2]} == {r["id"] for r in chat}
    assert {r["id"] for r in selected[1:4:2]} == {r["id"] for r in howto}
    assert [r["score"] for r in selected[:4]] == pytest.approx([1.0] * 4, abs=1e-3)
    # the selection is the round-robin over every stored embedding and the written target embeddings
    stored = pq.read_table(out / "scores", columns=["id", "dataset", "embedding"])
    target_table = pq.read_table(out / "target_embeddings.parquet").to_pylist()
    examples = {
        task: np.array([t["embedding"] for t in target_table if t["task"] == task])
        for task in ("chat", "howto")
    }
    expected = similarity_select([stored], examples, len(selected))
    assert [r["id"] for r in selected] == expected["id"].to_pylist()
    assert [r["target_task"] for r in selected] == expected["target_task"].to_pylist()
    assert scores_by_id(out) == scores_by_id(one_actor)  # the gate scores are still computed and stored
    rerun = run_select(tiny_olmoe, tmp_path / "similar_2", sources, **{**keys, "scoring.num_actors": 2})
    assert (rerun / "selected.jsonl").read_bytes() == (out / "selected.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="selection.targets and selection.target_eval_dir are read only"):
        run_select(tiny_olmoe, tmp_path / "top", sources, **{**keys, "selection.method": "top_k"})


@pytest.mark.timeout(600)
def test_calibrated_ranks_rows_by_a_combiner_fitted_on_the_trusted_rows(tiny_olmoe, tmp_path, sources):
    """selection.method=calibrated (preset=calibrated): trusted rows scored with the corpus's passes, a
    logistic regression against the corpus, its log-odds ranks the corpus; bad trusted lines are
    rejects; the combiner's stored numbers give the selection again from the score files."""
    from selectmoe.select.calibrate import combiner_score

    trusted = tmp_path / "trusted.jsonl"
    lines = (TRAIN_DIR / "cot.jsonl").read_text().splitlines()[:40]
    trusted.write_text("\n".join(lines) + "\n{broken\n")
    keys = {
        "selection.method": "calibrated",
        "selection.trusted": f"[{trusted}]",
        "scoring.lm_loss": True,
        "scoring.prompt_gain": True,
        "scoring.num_actors": 1,
    }
    out = run_select(tiny_olmoe, tmp_path / "calibrated", sources, **keys)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["metrics"]["calibrated"]
    combiner = json.loads((out / "calibration.json").read_text())
    rejects = [json.loads(line) for line in (out / "trusted_rejects.jsonl").read_text().splitlines()]
    assert rejects[-1]["line"] == 41 and rejects[-1]["reason"].startswith("bad_json")
    # the rest are rows too long for dataset.max_sequence_length (128 here): nothing lost silently
    assert info["trusted_rows"] == combiner["trusted_rows"] == 41 - len(rejects) >= 10
    assert info["corpus_rows"] == manifest["counts"]["rows_scored"]  # every corpus row: below the sample cap
    assert set(info["coefficients"]) == {
        "gate_layer_0", "gate_layer_1", "nll", "prompt_gain", "log_scored_tokens", "reply_redundancy"
    }  # fmt: skip
    assert 0.5 < info["cv_auroc"] <= 1.0  # cot rows look unlike oasst1 / human_instructions rows
    stored = pq.read_table(out / "scores").to_pydict()
    score = combiner_score(
        combiner,
        {
            k: np.asarray(v, dtype=np.float64)
            for k, v in stored.items()
            if k not in ("id", "dataset", "source")
        },
    )
    expected = sorted(zip(-score, stored["id"]))[: manifest["counts"]["rows_selected"]]
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == [i for _, i in expected]
    assert [r["score"] for r in selected] == pytest.approx([-s for s, _ in expected])
    with pytest.raises(ConfigError, match="selection.trusted is read by selection.method=calibrated, or"):
        run_select(tiny_olmoe, tmp_path / "random", sources, **{**keys, "selection.method": "random"})


@pytest.mark.timeout(600)
def test_balance_dataset_keeps_the_corpus_mix_in_each_methods_order(one_actor, tiny_olmoe, tmp_path, sources):
    """selection.balance=dataset: each source dataset gets its share of k (or selection.quotas), top_k
    takes each dataset's best-scored rows, random a seeded draw inside each; other methods reject it.
    The corpus's scores are reused (copied): no model loads."""
    from selectmoe.select.topk import dataset_quotas

    stored = pq.read_table(one_actor / "scores", columns=["id", "dataset", "score"]).to_pylist()
    counts = Counter(r["dataset"] for r in stored)
    k = int(0.1 * len(stored))
    out = tmp_path / "balanced"
    shutil.copytree(one_actor / "scores", out / "scores")

    def selected(**keys) -> list[dict]:
        run_select(tiny_olmoe, out, sources, **keys)
        return [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]

    def best(name: str, n: int) -> list[str]:
        mine = sorted((r for r in stored if r["dataset"] == name), key=lambda r: (-r["score"], r["id"]))
        return [r["id"] for r in mine[:n]]

    quotas = dataset_quotas(dict(counts), k, None)
    assert len(quotas) == 2 and sum(quotas.values()) == k  # two source datasets here
    top = selected(**{"selection.balance": "dataset"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["balance"]["quotas"] == quotas
    assert manifest["counts"]["selected_by_dataset"] == quotas
    for name, quota in quotas.items():
        assert [r["id"] for r in top if r["dataset"] == name] == best(name, quota)
    assert [r["score"] for r in top] == sorted((r["score"] for r in top), reverse=True)

    drawn = selected(**{"selection.balance": "dataset", "selection.method": "random"})
    assert Counter(r["dataset"] for r in drawn) == Counter(quotas)
    assert {r["id"] for r in drawn} != {r["id"] for r in top}
    assert drawn == selected(**{"selection.balance": "dataset", "selection.method": "random"})  # seeded

    name, other = sorted(counts)
    given = selected(**{"selection.balance": "dataset", "selection.quotas": f"{{{name}: 3, {other}: 0.05}}"})
    assert [r["id"] for r in given if r["dataset"] == name] == best(name, 3)
    assert [r["id"] for r in given if r["dataset"] == other] == best(other, int(0.05 * counts[other]))

    # filtered_random keeps the mix by default (balance=auto); balance=none draws once over the kept rows
    # (per dataset only: human_instructions' frequent answers, such as "1", would be strata of their own)
    for balance in ("auto", "none"):
        keys = {
            "selection.method": "filtered_random",
            "selection.balance": balance,
            "selection.strata": "dataset",
        }
        drawn = selected(**keys)
        info = json.loads((out / "manifest.json").read_text())["metrics"]["filtered_random"]
        floor = info["dataset_thresholds"]
        assert len(drawn) == k and all(r["score"] >= floor[r["dataset"]] for r in drawn)
        assert ("quotas" in info) == (balance == "auto")
        if balance == "auto":
            assert Counter(r["dataset"] for r in drawn) == Counter(quotas)

    with pytest.raises(ConfigError, match=r"selection.quotas names \['nowhere'\]"):
        run_select(
            tiny_olmoe, out, sources, **{"selection.balance": "dataset", "selection.quotas": "{nowhere: 3}"}
        )
    with pytest.raises(ConfigError, match="selection.balance=dataset keeps the corpus mix"):
        run_select(
            tiny_olmoe, out, sources, **{"selection.balance": "dataset", "selection.method": "threshold",
                                         "selection.threshold": 0.5}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="selection.quotas are the per-dataset quotas"):
        run_select(tiny_olmoe, out, sources, **{"selection.quotas": f"{{{name}: 3}}"})


@pytest.mark.timeout(600)
def test_a_trusted_set_sets_the_sign_of_the_gate_term(one_actor, tiny_olmoe, tmp_path, sources):
    """With a score formula (here the original mean gate, top_k) selection.trusted decides the gate
    term's sign: trusted rows the gates score lowest make it negative and the selection the rows with
    the lowest mean gate; those they score highest keep it, and the selection is the plain one's. The
    corpus's scores are reused (copied): only the trusted rows are scored."""
    stored = pq.read_table(one_actor / "scores", columns=["id", "layer_scores"])
    gate = dict(zip(stored["id"].to_pylist(), np.asarray(stored["layer_scores"].to_pylist()).mean(axis=1)))
    lines = {
        json.loads(line)["id"]: line
        for f in sorted(sources.glob("*.jsonl"))
        for line in f.read_text().splitlines(keepends=True)
    }
    by_gate = sorted(gate, key=lambda i: (gate[i], i))
    out = tmp_path / "signed"
    shutil.copytree(one_actor / "scores", out / "scores")
    plain = [json.loads(line)["id"] for line in (one_actor / "selected.jsonl").read_text().splitlines()]
    for name, trusted_ids, sign in (("low", by_gate[:20], -1.0), ("high", by_gate[-20:], 1.0)):
        trusted = tmp_path / f"{name}.jsonl"
        trusted.write_text("".join(lines[i] for i in trusted_ids))
        run_select(tiny_olmoe, out, sources, **{"selection.trusted": f"[{trusted}]", "scoring.num_actors": 1})
        manifest = json.loads((out / "manifest.json").read_text())
        signed = manifest["metrics"]["gate_sign"]
        assert signed["gate_weight"] == sign and signed["configured_gate_weight"] == 1.0
        assert signed["trusted_rows"] == 20 and signed["corpus_rows"] == len(gate)
        assert (signed["mean_gate_auroc"] < 0.1) if sign < 0 else (signed["mean_gate_auroc"] > 0.9)
        assert manifest["metrics"]["score_formula"] == ("-mean gate" if sign < 0 else "mean gate")
        selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
        expected = by_gate[: len(plain)] if sign < 0 else plain
        assert [r["id"] for r in selected] == expected
        assert [r["score"] for r in selected] == pytest.approx([sign * gate[i] for i in expected])
    with pytest.raises(ConfigError, match="scoring.gate_weight is 0"):
        run_select(
            tiny_olmoe, out, sources, **{"selection.trusted": f"[{trusted}]", "scoring.gate_weight": 0}
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_commands_started_together_both_finish(tiny_olmoe, tmp_path):
    """Each `selectmoe select` starts its own local Ray; the one that loses the dashboard-port race
    retries on another port instead of crashing, and both give the same selection."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join((TRAIN_DIR / "oasst1.jsonl").read_text().splitlines()[:24]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "selectmoe.cli", "select"]
            + select_overrides(tiny_olmoe, tmp_path / f"run{i}", **{"dataset.data_path": str(rows)}),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=540)[0] for run in runs]
    for i, (run, output) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, output[-3000:]
        # the terminal got phase lines and the result; Ray's own output went to the run's log
        assert output.strip().splitlines()[-1] == str(tmp_path / f"run{i}") and len(output.splitlines()) <= 12
        assert "Started a local Ray instance" in (tmp_path / f"run{i}" / "logs" / "console.log").read_text()
    first, second = ((tmp_path / f"run{i}" / "selected.jsonl").read_bytes() for i in range(2))
    assert first == second and first


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_strata_reply_keeps_each_frequent_answers_share_of_the_selection(ray_session, tiny_olmoe, tmp_path):
    """selection.strata=reply (auto's choice for filtered_random): each reply that 5 or more rows of a
    dataset give is a stratum of its own, with its own threshold and quota, so the selection keeps the
    dataset's answer mix; the score files hold one reply hash per reply text; the selection names the
    real datasets; a rerun by dataset strata reuses the score files. An answer 4 rows give is no stratum;
    top_k takes no reply strata."""
    from selectmoe.select.topk import dataset_quotas, reply_stratum, selection_size

    replies = ["(A)"] * 30 + ["(B)"] * 15 + ["(C)"] * 4 + [f"It is option number {i}." for i in range(11)]
    rows = [
        {"id": f"quiz{i:02d}", "dataset": "quiz", "messages": [
            {"role": "user", "content": f"Question {i}: which option is right, (A), (B) or (C)?"},
            {"role": "assistant", "content": reply},
        ]}
        for i, reply in enumerate(replies)
    ] + [
        {"id": f"chat{i:02d}", "dataset": "chat", "messages": [
            {"role": "user", "content": f"Tell me one thing about the number {i}."},
            {"role": "assistant", "content": f"The number {i} comes after {i - 1}."},
        ]}
        for i in range(40)
    ]  # fmt: skip
    data = tmp_path / "rows"
    data.mkdir()
    for name in ("quiz", "chat"):
        (data / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if r["dataset"] == name)
        )
    keys = {
        "selection.method": "filtered_random",
        "selection_percentage": 0.5,
        "scoring.perplexity_weight": 1.0,
    }
    out = run_select(
        tiny_olmoe, tmp_path / "by_reply", data, **keys
    )  # strata=auto: reply, for filtered_random
    scored = {r["id"]: r for r in pq.read_table(out / "scores").to_pylist()}
    reply_of = {r["id"]: r["messages"][1]["content"] for r in rows}
    hash_of = {}
    for i, row in scored.items():
        hash_of.setdefault(reply_of[i], set()).add(row["reply_hash"])
    assert all(len(h) == 1 for h in hash_of.values())  # one hash per reply text, another for another
    hash_of = {reply: h.pop() for reply, h in hash_of.items()}
    assert len(set(hash_of.values())) == len(hash_of)

    manifest = json.loads((out / "manifest.json").read_text())
    how = manifest["metrics"]["filtered_random"]
    assert how["strata"] == "reply" and how["frequent_replies_by_dataset"] == {"quiz": 2}
    assert "(selection.strata)" in how["chosen_by"]
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in selected} == {"quiz", "chat"}

    def stratum(i: str) -> str:
        frequent = i.startswith("quiz") and reply_of[i] in ("(A)", "(B)")
        return reply_stratum("quiz", hash_of[reply_of[i]]) if frequent else scored[i]["dataset"]

    sizes = Counter(stratum(i) for i in scored)
    assert sorted(sizes.values()) == [15, 15, 30, 40]
    assert set(how["dataset_thresholds"]) == set(sizes)
    # each dataset keeps its share exactly, shared among its strata by their rows
    by_dataset = dataset_quotas({"quiz": 60, "chat": 40}, selection_size(len(scored), 0.5), None)
    quotas = dataset_quotas({s: n for s, n in sizes.items() if s != "chat"}, by_dataset["quiz"], None)
    assert Counter(stratum(r["id"]) for r in selected) == {**quotas, "chat": by_dataset["chat"]}
    assert Counter(r["dataset"] for r in selected) == by_dataset
    # a row of each frequent reply, to read what its stratum is
    examples = how["frequent_reply_examples"]
    assert {reply_of[i] for i in examples.values()} == {"(A)", "(B)"}
    assert all(name == stratum(i) for name, i in examples.items())
    # each stratum's rows are drawn from at or above its own threshold
    assert all(r["score"] >= how["dataset_thresholds"][stratum(r["id"])] for r in selected)

    rerun = run_select(tiny_olmoe, out, data, **keys, **{"selection.strata": "dataset"})
    manifest = json.loads((rerun / "manifest.json").read_text())
    assert manifest["counts"]["rows_scored_before"] == len(scored)
    assert "strata" not in manifest["metrics"]["filtered_random"]
    assert set(manifest["metrics"]["filtered_random"]["dataset_thresholds"]) == {"quiz", "chat"}
    with pytest.raises(ConfigError, match="selection.strata=reply"):
        run_select(tiny_olmoe, out, data, **{"selection.strata": "reply"})  # top_k

"""Stage 3 on Ray Train, tiny Llama, real rows: labels, loss, adapter, DDP and FSDP, recovery, rerun,
batch plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selectmoe.cli import main
from selectmoe.config import parse_config
from selectmoe.data.template import IGNORE_INDEX
from selectmoe.finetune.driver import finetune, read_training_rows
from selectmoe.layout import RAY_TRAIN_DIR
from selectmoe.training.common import BatchPlan

TRAIN_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "oasst1.jsonl"
N_ROWS = 40


@pytest.fixture(scope="module")
def selected_jsonl(tmp_path_factory) -> Path:
    """Stage 2's output form: LESS rows + ``score`` and ``rank`` (the first rows of oasst1)."""
    path = tmp_path_factory.mktemp("selection") / "selected.jsonl"
    lines = TRAIN_FILE.read_text().splitlines()[:N_ROWS]
    rows = [
        {**json.loads(line), "score": 1.0 - rank / N_ROWS, "rank": rank} for rank, line in enumerate(lines)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# the 2-worker DDP run fails once at step 7: with checkpoints at steps 3, 4 (epoch end) and 6 it resumes
# mid-epoch from step 6
FAILS_ONCE = {"training.fail_at_step": 7}


def stage3_overrides(llama: Path, data: Path, out: Path, **extra) -> list[str]:
    # 37 of the 40 rows survive max_sequence_length 128 -> 4 steps per epoch of 8 rows (2 per device x
    # 2 accumulation x 2 workers); LESS's dropout 0.1 stays on, so resume must reproduce dropout masks
    values = {
        "model.name": str(llama),
        "output_dir": str(out),
        "dataset.data_path": str(data),
        "dataset.max_sequence_length": 128,
        "training.batch_size": 8,
        "training.per_device_batch_size": 2,
        "training.epochs": 2,
        "training.learning_rate": 1e-2,
        "training.lora.r": 8,
        "training.lora.lora_alpha": 32,
        "training.checkpoint_every_steps": 3,
        "scaling.num_workers": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def finetuned(tiny_llama, selected_jsonl, ray_session, tmp_path_factory) -> Path:
    """One 2-worker run through the CLI, shared by the tests below; it fails once and resumes
    (``FAILS_ONCE``), and must still match the uninterrupted FSDP run below."""
    out = tmp_path_factory.mktemp("stage3") / "run"
    assert main(["finetune", *stage3_overrides(tiny_llama, selected_jsonl, out, **FAILS_ONCE)]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned_fsdp(tiny_llama, selected_jsonl, ray_session, tmp_path_factory) -> Path:
    """The same run under FSDP2 (LoRA factors and frozen layers sharded over the 2 workers), uninterrupted."""
    out = tmp_path_factory.mktemp("stage3_fsdp") / "run"
    overrides = stage3_overrides(tiny_llama, selected_jsonl, out, **{"scaling.strategy": "fsdp"})
    finetune(parse_config("finetune", overrides=overrides))
    return out


# ---------------------------------------------------------------------------- batch plan


@pytest.mark.parametrize(
    ("batch_size", "per_device", "workers", "accumulation", "effective"),
    [
        (128, 1, 1, 128, 128),  # LESS on one GPU
        (128, 1, 8, 16, 128),  # LESS on 8 GPUs
        (128, 2, 4, 16, 128),
        (128, 1, 3, 42, 126),  # 3 does not divide 128: 2 rows fewer per step
        (128, 4, 6, 5, 120),
        (8, 4, 4, 1, 16),  # one micro-batch per worker is the least: more than asked
        (8, 2, 2, 2, 8),  # the tests' runs
    ],
)
def test_effective_batch_is_per_device_x_accumulation_x_workers(
    batch_size, per_device, workers, accumulation, effective
):
    plan = BatchPlan(batch_size, per_device, workers)
    assert plan.accumulation == accumulation
    assert plan.effective_batch == effective == per_device * accumulation * workers
    assert plan.is_exact == (effective == batch_size)
    assert plan.steps_per_epoch(1000) == 1000 // effective
    assert plan.describe().startswith(f"effective batch {effective} = ")


# ---------------------------------------------------------------------------- labels


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_only_assistant_tokens_carry_labels(tiny_llama, selected_jsonl, ray_session, tmp_path):
    """The rows the workers train on (read and tokenised by the scan, in one pass): labelled tokens decode
    to the assistant turns, nothing else; ``data.loss_on=all`` labels every token."""
    from selectmoe.data.template import load_tokenizer

    cfg = parse_config("finetune", overrides=stage3_overrides(tiny_llama, selected_jsonl, tmp_path))
    tokenizer = load_tokenizer(str(tiny_llama))
    read = read_training_rows(cfg, str(tiny_llama), tmp_path / "scratch")
    originals = {json.loads(line)["id"]: json.loads(line) for line in selected_jsonl.read_text().splitlines()}
    rows = read.rows.take_all()
    assert len(rows) == read.ledger.counts()["rows_accepted"] > 30
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        assert len(ids) <= 128
        spans = _labelled_spans(labels)
        replies = [m["content"].strip() for m in originals[row["id"]]["messages"] if m["role"] == "assistant"]
        assert 1 <= len(spans) <= len(replies)
        for (start, end), reply in zip(spans, replies):
            assert labels[start:end] == ids[start:end]
            text = tokenizer.decode(ids[start:end])
            if end < len(ids) or text.endswith(tokenizer.eos_token):  # a complete turn, then its EOS
                assert text == reply + tokenizer.eos_token
            else:  # cut by max_sequence_length
                assert reply.startswith(text)
        assert "<|user|>" in tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])

    cfg_all = parse_config(
        "finetune", overrides=[*stage3_overrides(tiny_llama, selected_jsonl, tmp_path), "data.loss_on=all"]
    )
    rows_all = read_training_rows(cfg_all, str(tiny_llama), tmp_path / "scratch").rows.take_all()
    assert [r["id"] for r in rows_all] == [r["id"] for r in rows]
    assert all(list(r["labels"]) == list(r["input_ids"]) for r in rows_all)


def _labelled_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------------------- the 2-worker run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_writes_an_adapter_folder_with_tokenizer_metrics_and_manifest(finetuned, tiny_llama):
    out = finetuned
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).exists(), name
    assert (out / "training_curves.png").stat().st_size > 0
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama)
    assert adapter_config["r"] == 8 and sorted(adapter_config["target_modules"]) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(
        ".lora_A." in name or ".lora_B." in name for name in tensors
    )  # no resized embeddings

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))  # what stage 4 loads from eval.adapter
    assert (
        tokenizer.pad_token == tokenizer.unk_token
        and len(tokenizer) == AutoConfig.from_pretrained(str(tiny_llama)).vocab_size
    )

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune"
    counts = manifest["counts"]
    assert counts["rows_read"] == N_ROWS == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts["rows_trained"] == counts["rows_accepted"]
    assert counts["workers"] == 2 and counts["effective_batch"] == 8 and counts["gradient_accumulation"] == 2
    assert counts["steps"] == 2 * (counts["rows_trained"] // 8)
    history = metrics(out)
    assert [m["step"] for m in history] == list(range(1, counts["steps"] + 1))
    assert manifest["metrics"]["final_loss"] == history[-1]["loss"]
    for m in history:
        assert 0 < m["labelled_tokens"] < m["tokens"]  # prompts and padding carry no loss


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loss_falls(finetuned):
    history = metrics(finetuned)
    first_epoch = [m["loss"] for m in history if m["epoch"] == 0]
    last_epoch = [m["loss"] for m in history if m["epoch"] == 1]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert sum(last_epoch) / len(last_epoch) < sum(first_epoch) / len(first_epoch)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", ["finetuned", "finetuned_fsdp"])
def test_adapter_loads_with_peft_and_changes_the_model(run, tiny_llama, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    finetuned = request.getfixturevalue(run)
    tensors = load_file(str(finetuned / "adapter_model.safetensors"))
    lora_b = [name for name in tensors if ".lora_B." in name]
    assert len(lora_b) == 2 * 4  # layers x q/k/v/o
    assert all(tensors[name].abs().max() > 0 for name in lora_b)  # gradients reached every layer

    ids = torch.arange(1, 33).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(finetuned)).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_matches_ddp_and_a_resumed_run_matches_an_uninterrupted_one(finetuned_fsdp, finetuned):
    """The uninterrupted FSDP run against the DDP run that failed at step 7 and resumed from step 6: one
    run fewer than a resumed DDP twin of its own; stage 1 checks FSDP's resume and a resume at 1e-6."""
    assert (finetuned / ".injected_failure_done").read_text().startswith("failed at step 7")
    assert not (finetuned_fsdp / ".injected_failure_done").exists()
    sharded, replicated = metrics(finetuned_fsdp), metrics(finetuned)
    assert [m["step"] for m in sharded] == [m["step"] for m in replicated]  # no step lost or repeated
    assert [(m["step"], m["resumed_from_step"]) for m in replicated if "resumed_from_step" in m] == [(7, 6)]
    assert not any("resumed_from_step" in m for m in sharded)
    for a, b in zip(sharded, replicated):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    configs = [json.loads((run / "adapter_config.json").read_text()) for run in (finetuned_fsdp, finetuned)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT: any order
    assert configs[0] == configs[1]
    sharded_weights = load_file(str(finetuned_fsdp / "adapter_model.safetensors"))
    replicated_weights = load_file(str(finetuned / "adapter_model.safetensors"))
    assert sharded_weights.keys() == replicated_weights.keys()
    for name, value in replicated_weights.items():
        torch.testing.assert_close(sharded_weights[name], value, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- rerun


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerun_with_the_same_config_resumes_instead_of_retraining(finetuned, tiny_llama, selected_jsonl):
    adapter = (finetuned / "adapter_model.safetensors").read_bytes()
    history = metrics(finetuned)
    checkpoints = sorted((finetuned / RAY_TRAIN_DIR).rglob("checkpoint_*"))
    overrides = stage3_overrides(tiny_llama, selected_jsonl, finetuned, **FAILS_ONCE)
    finetune(parse_config("finetune", overrides=overrides))
    assert (finetuned / "adapter_model.safetensors").read_bytes() == adapter
    assert metrics(finetuned) == history
    assert sorted((finetuned / RAY_TRAIN_DIR).rglob("checkpoint_*")) == checkpoints  # no new training step

"""Stage 1 on Ray Train with tiny models on real rows: what trains, DDP equivalence, LoRA, recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from selectmoe.cli import main
from selectmoe.config import parse_config
from selectmoe.models.loading import load_select_moe
from selectmoe.pretrain import pretrain_router

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRAIN_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


def stage1_overrides(olmoe: Path, out: Path, **extra) -> list[str]:
    values = {
        "selector_model.path": str(olmoe),
        "output_dir": str(out),
        "dataset.data_path": f"[{TRAIN_DIR / 'oasst1.jsonl'},{TRAIN_DIR / 'human_instructions.jsonl'}]",
        "dataset.subset_ratio": 0.05,
        "dataset.max_sequence_length": 128,
        "training.batch_size": 4,
        "training.per_device_batch_size": 1,
        "training.epochs": 1,
        "training.max_steps": 4,
        "training.learning_rate": 1e-2,
        "training.quality_loss_weight": 1.0,
        "training.gradient_checkpointing": False,
        "training.checkpoint_every_steps": 2,
        "scaling.num_workers": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_stage1(olmoe, out, **extra) -> Path:
    return pretrain_router(parse_config("pretrain", overrides=stage1_overrides(olmoe, out, **extra)))


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "router_weights.safetensors"))


@pytest.fixture(scope="module")
def two_worker_run(tiny_olmoe, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_ddp2")
    return run_stage1(tiny_olmoe, out, **{"scaling.num_workers": 2})


@pytest.fixture(scope="module")
def one_worker_run(tiny_olmoe, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_ddp1")
    return run_stage1(tiny_olmoe, out)


def test_two_worker_run_trains_only_router_weights(two_worker_run, tiny_olmoe):
    out = two_worker_run
    tensors = trained_tensors(out)
    n_layers = 2
    assert sorted(tensors) == sorted(
        [f"model.layers.{i}.mlp.{name}.weight" for i in range(n_layers) for name in ("gate", "quality_gate")]
    )
    base = load_select_moe(str(tiny_olmoe), dtype="float32")
    trained = load_select_moe(str(out), dtype="float32")  # stage-1 folder: base + trained router weights
    base_params = dict(base.named_parameters())
    for name, param in trained.named_parameters():
        if name in tensors:
            assert not torch.equal(param, base_params[name]), f"{name} did not change"
            torch.testing.assert_close(param, tensors[name])
        else:
            assert torch.equal(param, base_params[name]), f"{name} changed but is frozen"


def test_stage1_outputs_and_manifest(two_worker_run):
    out = two_worker_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain"
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts["workers"] == 2 and counts["steps"] == 4 and counts["effective_batch"] == 4
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    for key in ("lm_loss", "quality_loss", "gate_mean", "gate_std", "tokens_per_s", "lr"):
        assert key in history[-1]
    assert len(history[-1]["gate_mean"]) == 2
    info = json.loads((out / "select_moe_config.json").read_text())
    assert info["peft_mode"] == "full_rank" and info["select_moe"]["quality_loss_weight"] == 1.0
    ids = pq.read_table(out / "training_ids.parquet").to_pylist()
    assert len(ids) == counts["rows_trained"] and len({r["id"] for r in ids}) == len(ids)
    assert (out / "training_curves.png").stat().st_size > 0
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_two_workers_match_one_worker_with_the_same_global_batch(two_worker_run, one_worker_run):
    two, one = trained_tensors(two_worker_run), trained_tensors(one_worker_run)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


def test_injected_failure_resumes_and_matches_uninterrupted_run(
    tiny_olmoe, ray_session, one_worker_run, tmp_path
):
    out = tmp_path / "stage1_fail"
    run_stage1(tiny_olmoe, out, **{"training.fail_at_step": 3, "training.checkpoint_every_steps": 1})
    assert (out / ".injected_failure_done").exists()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]  # no step lost or repeated
    resumed, uninterrupted = trained_tensors(out), trained_tensors(one_worker_run)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5)


def test_lora_mode_saves_an_adapter_that_loads(tiny_olmoe, ray_session, tmp_path, capsys):
    out = tmp_path / "stage1_lora"
    argv = [
        "pretrain",
        *stage1_overrides(tiny_olmoe, out, **{"training.peft_mode": "lora", "training.lora.r": 4}),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "adapter" / "adapter_config.json").exists()
    base = load_select_moe(str(tiny_olmoe), dtype="float32")
    trained = load_select_moe(str(out), dtype="float32")  # merged adapter
    changed = [
        name
        for (name, p), (_, q) in zip(trained.named_parameters(), base.named_parameters())
        if not torch.equal(p, q)
    ]
    assert changed and all(name.endswith(("mlp.gate.weight", "mlp.quality_gate.weight")) for name in changed)

"""Stage 1 on Ray Train with tiny models on real rows: what trains, DDP and FSDP equivalence, LoRA,
recovery."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from selectmoe.cli import main
from selectmoe.config import parse_config
from selectmoe.data.template import ensure_pad_token, load_tokenizer
from selectmoe.models.loading import load_select_moe
from selectmoe.pretrain.driver import pretrain, probe_rows
from selectmoe.pretrain.worker import probe_aurocs, setup_trainable
from selectmoe.ray_data import read_rows

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
    return pretrain(parse_config("pretrain", overrides=stage1_overrides(olmoe, out, **extra)))


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "router_weights.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def two_worker_run(tiny_olmoe, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_ddp2")
    return run_stage1(tiny_olmoe, out, **{"scaling.num_workers": 2})


@pytest.fixture(scope="module")
def fsdp_config(tiny_olmoe, tmp_path_factory):
    """2-worker FSDP with one injected failure (resumed from the step-2 checkpoint) and the probe on
    (every rank runs it under FSDP): the cheapest single run that tries all three."""
    labels = tmp_path_factory.mktemp("probe") / "labels.jsonl"
    lines = (TRAIN_DIR / "oasst1.jsonl").read_text().splitlines()[:200]
    labels.write_text(
        "".join(
            json.dumps({"id": json.loads(line)["id"], "defect": "planted" if i % 5 < 2 else None}) + "\n"
            for i, line in enumerate(lines)
        )
    )
    extra = {
        "scaling.num_workers": 2,
        "scaling.strategy": "fsdp",
        "training.fail_at_step": 3,
        "training.probe_labels": str(labels),
        "training.probe_rows": 16,
        "training.probe_every_steps": 2,
    }
    out = tmp_path_factory.mktemp("stage1_fsdp2")
    return parse_config("pretrain", overrides=stage1_overrides(tiny_olmoe, out, **extra))


@pytest.fixture(scope="module")
def fsdp_run(fsdp_config, ray_session):
    return pretrain(fsdp_config)


@pytest.fixture(scope="module")
def one_worker_run(tiny_olmoe, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_ddp1")
    return run_stage1(tiny_olmoe, out)


@pytest.mark.parametrize("run", ["two_worker_run", "fsdp_run"])
def test_two_worker_run_trains_only_router_weights(run, tiny_olmoe, request):
    out = request.getfixturevalue(run)
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
    history = metrics(out)
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
    assert not (out / ".rows").exists()  # the scan's scratch (rows with their tokens) is removed


def test_two_workers_match_one_worker_with_the_same_global_batch(two_worker_run, one_worker_run):
    two, one = trained_tensors(two_worker_run), trained_tensors(one_worker_run)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


def test_cpu_workers_use_the_cores_ray_would_leave_idle(two_worker_run, one_worker_run):
    """Ray starts a 1-CPU worker with OMP_NUM_THREADS=1: one worker on this 2-CPU session must still
    run torch on both cores (its CPU and the one kept for Ray Data); two workers one each. The first
    step also reports how long the model took to load."""
    one, two = metrics(one_worker_run)[0], metrics(two_worker_run)[0]
    assert one["torch_threads"] == 2 and two["torch_threads"] == 1
    assert one["load_s"] > 0 and all("load_s" not in m for m in metrics(one_worker_run)[1:])
    assert all(m["step_s"] > 0 for m in metrics(one_worker_run))


def test_fsdp_matches_ddp_resumes_after_a_failure_and_probes_on_every_rank(
    fsdp_run, fsdp_config, two_worker_run, tiny_olmoe
):
    out = fsdp_run
    assert (out / ".injected_failure_done").exists()
    history, ddp = metrics(out), metrics(two_worker_run)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert [(m["step"], m["resumed_from_step"]) for m in history if "resumed_from_step" in m] == [(3, 2)]
    for a, b in zip(history, ddp):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["quality_loss"] == pytest.approx(b["quality_loss"], rel=1e-5)
    sharded, replicated = trained_tensors(out), trained_tensors(two_worker_run)
    assert sharded.keys() == replicated.keys()
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-4)

    # the last step's probe ran on the sharded model: the same AUROC as on the saved weights
    assert [m["step"] for m in history if "probe_auroc" in m] == [1, 2, 3, 4]  # latest value rides along
    read = read_rows(
        fsdp_config.dataset, fsdp_config.data, seed=fsdp_config.seed, tokenizer_name=str(tiny_olmoe)
    )
    rows = probe_rows(fsdp_config, str(tiny_olmoe), read)
    trained_ids = set(pq.read_table(out / "training_ids.parquet")["id"].to_pylist())
    assert not trained_ids & {r["id"] for r in read.outside_subset().take_all()}  # probes are unseen rows
    assert len(rows) > 8 and 0 < sum(r["clean"] for r in rows) < len(rows)  # both classes
    pad = ensure_pad_token(load_tokenizer(str(tiny_olmoe))).pad_token_id
    model = load_select_moe(str(out), dtype="float32")
    expected = probe_aurocs(model, probes={"probe_auroc": rows}, pad_token_id=pad)
    assert expected["probe_auroc"] != 0.5  # the labels tell something apart on these rows
    assert history[-1]["probe_auroc"] == pytest.approx(expected["probe_auroc"], abs=1e-6)
    # the manifest says which way the gates point on the probe, whichever way that is
    final = json.loads((out / "manifest.json").read_text())["metrics"]
    assert final["gate_quality_correlation"] == pytest.approx(2 * expected["probe_auroc"] - 1, abs=1e-6)
    assert final["gate_direction"].startswith("inverted" if expected["probe_auroc"] < 0.5 else "aligned")


def test_fsdp_units_of_a_bf16_body_with_fp32_trainable_parameters():
    """What the fp32 runs above cannot show on CPU: GPU's dtypes (frozen bf16 body, fp32 LoRA factors
    and gates in one FSDP2 unit), PEFT's LoRA on the bare router weight, gradient accumulation without
    sync, gathering and restoring the state. Two gloo processes, no Ray."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_bf16_fsdp_worker, args=(2, port), nprocs=2)


def _bf16_fsdp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from selectmoe.demo.tiny import tiny_olmoe_config
    from selectmoe.models.configuration import SelectMoeConfig
    from selectmoe.models.modeling import SelectMoeForCausalLM
    from selectmoe.training.sharding import gather_state, gradient_sync, restore_state, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def build():
        torch.manual_seed(0)
        config = SelectMoeConfig(**tiny_olmoe_config().to_dict(), quality_loss_weight=1.0)
        model = SelectMoeForCausalLM(config).to(torch.bfloat16)
        return setup_trainable(model, "lora", {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0}).train()

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    def loss(model, ids):
        return model(input_ids=ids, labels=ids, output_router_logits=True).loss

    reference = build()
    model = shard(copy.deepcopy(reference))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(trainable(reference), lr=1e-2)
    batches = [torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for _ in range(2):  # 2 micro-batches per rank vs all 4 unsharded
        for i, ids in enumerate(batches[2 * rank : 2 * rank + 2]):
            with gradient_sync(model, last_micro_batch=i == 1):
                (loss(model, ids) / 2).backward()
        for ids in batches:
            (loss(reference, ids) / 4).backward()
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            torch.nn.utils.clip_grad_norm_(trainable(m), 1.0)
            opt.step()
            opt.zero_grad()
    tensors, optimizer_state = gather_state(model, optimizer)
    shared = [tensors, optimizer_state]
    dist.broadcast_object_list(shared)  # rank 0 holds the full state, as after a checkpoint read
    if rank == 0:
        expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
        assert tensors.keys() == expected.keys() and len(tensors) == 6  # 2 layers x LoRA A, B, gate copy
        for name, value in expected.items():
            torch.testing.assert_close(tensors[name], value, atol=1e-6, rtol=1e-5)
    fresh = shard(build())
    fresh_optimizer = torch.optim.AdamW(trainable(fresh), lr=1e-2)
    restore_state(fresh, fresh_optimizer, *copy.deepcopy(shared))
    restored, restored_optimizer = gather_state(fresh, fresh_optimizer)
    if rank == 0:
        for name, value in shared[0].items():
            assert torch.equal(restored[name], value)
        for key, value in shared[1]["state"].items():
            assert torch.equal(restored_optimizer["state"][key]["exp_avg_sq"], value["exp_avg_sq"])
    dist.destroy_process_group()


def test_injected_failure_resumes_and_matches_uninterrupted_run(
    tiny_olmoe, ray_session, one_worker_run, tmp_path
):
    out = tmp_path / "stage1_fail"
    run_stage1(tiny_olmoe, out, **{"training.fail_at_step": 3, "training.checkpoint_every_steps": 1})
    assert (out / ".injected_failure_done").exists()
    history = metrics(out)
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

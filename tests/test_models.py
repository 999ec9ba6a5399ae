"""Select-MoE model: gradients, losses, padding invariance, OLMoE equivalence, save/load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, OlmoeForCausalLM

from selectmoe import SelectMoeConfig, SelectMoeForCausalLM
from selectmoe.demo.tiny import tiny_olmoe_config
from selectmoe.models import register_quality_loss, register_trash_expert
from selectmoe.models.loading import convert_olmoe, load_select_moe, max_logit_diff_gates_open
from selectmoe.models.losses import QUALITY_LOSSES, quality_loss
from selectmoe.models.modeling import gates_forced

LOSS_TYPES = ["sigmoid", "mse", "beta_moment_matching", "mean_variance_regularization"]


def tiny_config(**overrides) -> SelectMoeConfig:
    """ModelTester-sized: vocab 99, hidden 32, 2 layers, 8 experts top-2."""
    base = tiny_olmoe_config(vocab_size=99, hidden_size=32, intermediate_size=16).to_dict()
    values = {
        k: v for k, v in base.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    values.update(overrides)
    return SelectMoeConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> SelectMoeForCausalLM:
    torch.manual_seed(seed)
    return SelectMoeForCausalLM(tiny_config(**overrides)).eval()


def batch(bsz: int = 13, seq: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (bsz, seq), generator=g)
    return ids, torch.ones_like(ids)


# ---------------------------------------------------------------------------- outputs and losses


def test_router_logits_are_per_layer_dicts_with_seed_shapes():
    model = tiny_model()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == model.config.num_hidden_layers
    for layer in out.router_logits:
        assert layer["quality_score"].shape == (13, 7, 1)
        assert layer["moe_logits"].shape == (13 * 7, model.config.num_experts)


def test_total_loss_is_lm_plus_coef_times_weighted_quality_and_balancing():
    model = tiny_model(enable_load_balancing=True, quality_loss_weight=0.7, router_aux_loss_coef=0.3)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    expected_aux = 0.7 * out.quality_loss + out.load_balancing_loss
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * expected_aux)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_quality_loss_alone_reaches_every_gate(loss_type, checkpointing):
    # gates start at different values so the moment losses are not at a stationary point
    model = tiny_model(quality_loss_type=loss_type, quality_gate_init_std=0.5)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()  # default arguments, as users call it
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    out.quality_loss.backward()
    for layer in model.model.layers:
        grad = layer.mlp.quality_gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gate_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        ids, mask = batch()
        model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True).loss.backward()
        grads.append(
            torch.cat([layer.mlp.quality_gate.weight.grad.flatten() for layer in model.model.layers])
        )
    torch.testing.assert_close(grads[0], grads[1])


def _reference_config(**overrides):
    values = dict(
        quality_loss_type="sigmoid",
        sample_wise_averaging=False,
        beta_target_mean=0.5,
        beta_target_var=0.05,
        w_mean=1.0,
        w_var=2.0,
        lambda_var=0.1,
        quality_loss_debug=False,
    )
    values.update(overrides)
    return type("Cfg", (), values)


def test_losses_equal_hand_computed_values():
    # two layers, two rows; row 1 has one padding token (mask 0) that must not count
    logits = [torch.tensor([[[0.0], [1.0], [-1.0]], [[2.0], [0.5], [9.0]]]), torch.zeros(2, 3, 1)]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    s = torch.sigmoid
    g0 = [s(torch.tensor(x)).item() for x in (0.0, 1.0, -1.0, 2.0, 0.5)]  # counted gates, layer 0
    mean0 = sum(g0) / 5
    var0 = sum((g - mean0) ** 2 for g in g0) / 5
    mean1, var1 = 0.5, 0.0  # layer 1: all gates 0.5

    def check(cfg, per_layer):
        torch.testing.assert_close(quality_loss(logits, mask, cfg), torch.tensor(sum(per_layer) / 2))

    check(_reference_config(quality_loss_type="sigmoid"), [mean0, mean1])
    check(_reference_config(quality_loss_type="mse"), [sum(g * g for g in g0) / 5, 0.25])
    check(
        _reference_config(quality_loss_type="beta_moment_matching"),
        [(m - 0.5) ** 2 + 2.0 * (v - 0.05) ** 2 for m, v in ((mean0, var0), (mean1, var1))],
    )
    check(
        _reference_config(quality_loss_type="mean_variance_regularization"),
        [(m - 0.5) ** 2 - 0.1 * v for m, v in ((mean0, var0), (mean1, var1))],
    )
    # sample-wise: rows weigh equally (row 0 has 3 counted tokens, row 1 has 2)
    row_means = [sum(g0[:3]) / 3, sum(g0[3:]) / 2]
    check(_reference_config(sample_wise_averaging=True), [sum(row_means) / 2, 0.5])


def test_loss_settings_are_read_from_config_at_forward_time():
    model = tiny_model(quality_gate_init_std=0.5)
    ids, mask = batch()
    values = {}
    for loss_type in LOSS_TYPES:
        model.config.quality_loss_type = loss_type  # the seed's documented way
        values[loss_type] = model(
            input_ids=ids, attention_mask=mask, output_router_logits=True
        ).quality_loss.item()
    assert len(set(values.values())) == len(LOSS_TYPES)


def test_quality_loss_on_assistant_tokens_only_uses_labels():
    model = tiny_model(quality_gate_init_std=0.5, quality_loss_tokens="assistant")
    ids, mask = batch(bsz=2)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    manual = torch.stack(
        [torch.sigmoid(layer["quality_score"][:, 4:, 0]).mean() for layer in out.router_logits]
    ).mean()
    torch.testing.assert_close(out.quality_loss, manual)


def test_custom_losses_and_trash_experts_are_registered_by_name():
    register_quality_loss("test_max_gate", lambda gates, mask, cfg: gates[mask].max(), overwrite=True)
    model = tiny_model(quality_loss_type="test_max_gate")
    ids, mask = batch(bsz=2)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    expected = torch.stack(
        [torch.sigmoid(layer["quality_score"]).max() for layer in out.router_logits]
    ).mean()
    torch.testing.assert_close(out.quality_loss, expected)
    assert "test_max_gate" in QUALITY_LOSSES

    register_trash_expert("test_identity", lambda expert_output, hidden: expert_output, overwrite=True)
    model = tiny_model(trash_expert_mode="custom", custom_trash_expert="test_identity")
    with torch.no_grad():
        got = model(input_ids=ids).logits
        with gates_forced(model, 1.0):
            open_logits = model(input_ids=ids).logits
    torch.testing.assert_close(got, open_logits)  # identity trash == experts whatever the gate

    model = tiny_model(trash_expert_mode="custom", custom_trash_expert="never_registered")
    with pytest.raises(ValueError, match="never_registered"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="custom_trash_expert"):
        tiny_config(trash_expert_mode="custom")


# ---------------------------------------------------------------------------- padding invariance


def _gates(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return torch.stack([layer["quality_score"][..., 0] for layer in out.router_logits], dim=-1)  # (B, T, L)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("trash", ["zero", "noise"])
def test_row_gates_do_not_depend_on_batch_neighbours_or_padding_side(attn, trash):
    model = tiny_model(seed=1, trash_expert_mode=trash)
    model.config._attn_implementation = attn
    short = torch.tensor([[5, 6, 7, 8]])
    longer = torch.tensor([[9, 10, 11, 12, 13, 14, 15]])
    alone = _gates(model, short, torch.ones_like(short))[0]  # (4, L)
    pad = 0
    right = torch.cat([torch.cat([short, torch.full((1, 3), pad)], 1), longer])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])
    left = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), longer])
    left_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    torch.testing.assert_close(_gates(model, right, right_mask)[0, :4], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_gates(model, left, left_mask)[0, 3:], alone, atol=1e-5, rtol=1e-4)


def test_noise_trash_expert_is_seeded_and_fixed_per_position():
    ids, mask = batch(bsz=2)
    a = tiny_model(seed=2, trash_expert_mode="noise", quality_gate_init_std=1.0)
    b = tiny_model(seed=2, trash_expert_mode="noise", quality_gate_init_std=1.0)
    zero = tiny_model(seed=2, trash_expert_mode="zero", quality_gate_init_std=1.0)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
        assert not torch.allclose(a(input_ids=ids).logits, zero(input_ids=ids).logits)


# ---------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def olmoe_checkpoints(tmp_path_factory):
    """A tiny OLMoE saved in the published per-expert layout and in transformers' fused layout."""
    root = tmp_path_factory.mktemp("olmoe")
    torch.manual_seed(0)
    olmoe = OlmoeForCausalLM(tiny_olmoe_config(vocab_size=99, hidden_size=32, intermediate_size=16)).eval()
    per_expert = root / "per_expert"
    olmoe.save_pretrained(per_expert)  # transformers writes the published per-expert tensor names
    fused = root / "fused"
    olmoe.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in olmoe.state_dict().items()}, fused / "model.safetensors")
    return olmoe, per_expert, fused


def test_checkpoint_layouts_differ_as_intended(olmoe_checkpoints):
    from safetensors import safe_open

    _, per_expert, fused = olmoe_checkpoints
    with safe_open(per_expert / "model.safetensors", "pt") as f:
        assert any(".experts.0.gate_proj.weight" in k for k in f.keys())
    with safe_open(fused / "model.safetensors", "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_olmoe_loads_into_select_moe_and_matches_with_gates_open(olmoe_checkpoints, layout):
    olmoe, per_expert, fused = olmoe_checkpoints
    path = per_expert if layout == "per_expert" else fused
    model = load_select_moe(str(path), dtype="float32").eval()
    ids, mask = batch()
    with torch.no_grad(), gates_forced(model, 1.0):
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = olmoe(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max().item() <= 1e-5
    # with the real gates (g = sigmoid(q) < 1) the output differs: the gates do something
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max().item() > 1e-4


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_no_checkpoint_file_stays_mapped_after_the_load(olmoe_checkpoints, layout):
    """transformers memory-maps the files, fuses a per-expert checkpoint's experts into new tensors and
    leaves the other tensors views of the mapped files, which keeps the expert pages read during the
    load resident (+9.5 GiB of RSS at OLMoE-1B-7B's shape). ``load_select_moe`` reads the tensors
    instead: no file of the checkpoint is mapped once it returns."""
    _, per_expert, fused = olmoe_checkpoints
    path = per_expert if layout == "per_expert" else fused
    model = load_select_moe(str(path), dtype="float32")
    checkpoint = str(path / "model.safetensors")
    assert not [
        line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(checkpoint)
    ]
    ids, mask = batch()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


_PEAK_OF_A_LOAD = """
import sys
from selectmoe.models.loading import load_select_moe

def mib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024

before = mib("VmRSS")
model = load_select_moe(sys.argv[1], dtype="float32")
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024**2
print((mib("VmHWM") - before) / weights)
"""


def test_the_load_reads_the_checkpoint_no_faster_than_it_places_it(tmp_path):
    """transformers reads tensors in 4 threads ahead of the loop that fuses and places them; from a
    checkpoint in the page cache (as here, just written) the reads race ahead and the load peaked 4.7
    GiB above OLMoE-1B-7B's 12.9 GiB of weights. ``load_select_moe`` reads each tensor as the loop needs
    it. At this shape (200 MB of per-expert weights) the peak above the start was 2.3x the weights with
    the read-ahead, 1.4-1.5x without."""
    torch.manual_seed(0)
    config = tiny_olmoe_config(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_experts=16
    )
    OlmoeForCausalLM(config).save_pretrained(tmp_path / "olmoe")  # per-expert layout, in the page cache
    peak = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_A_LOAD, str(tmp_path / "olmoe")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()[-1]
    assert float(peak) < 1.8


_MEMORY_OF_MANY_SHAPES = """
import os, sys
import torch
from selectmoe.config import ScoringSection
from selectmoe.models.loading import release_freed_memory
from selectmoe.select.scorer import GateScorer

if sys.argv[1:]:  # a CPU scorer of a bf16 model, as a scoring actor starts
    GateScorer(sys.argv[1], scoring=ScoringSection(), pad_token_id=0, dtype="bfloat16")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # restored: children keep the cache

def mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

w = torch.randn(2048, 2048, dtype=torch.bfloat16)
x = torch.randn(768, 2048, dtype=torch.bfloat16)
x @ w
before = mib()
for rows in range(257, 769):  # as an MoE's experts: a new token count in every call
    x[:rows] @ w
release_freed_memory()
print(mib() - before)
"""


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="bf16 matmuls go through oneDNN only on CPUs it supports bf16 on",
)
def test_cpu_scoring_does_not_keep_a_matmul_per_shape(olmoe_checkpoints):
    """oneDNN caches up to 1,024 built matmuls by shape, each with scratch memory of its own; an MoE's
    experts see a new token count in nearly every batch, and at OLMoE-1B-7B's shape the scoring actor
    grew to 1.45x its weights. A CPU ``GateScorer`` builds its first matmuls uncached, so its process
    stays uncached, and leaves the environment as it was. 512 bf16 matmul shapes left ~290 MiB resident in
    a plain process and ~155 MiB less in one that started a scorer first on an AMD EPYC (avx512_bf16, no AMX);
    128 shapes on a CPU with AMX left 250-440 MiB and 40-200 MiB less, but only 72 and 43 MiB less on the
    EPYC, so the test takes 512."""
    _, per_expert, _ = olmoe_checkpoints

    def grown(*scorer: str) -> float:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_OF_MANY_SHAPES, *scorer],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
            env=env,
        )
        return float(done.stdout.split()[-1])

    assert grown() - grown(str(per_expert)) > 100


def test_release_freed_memory_hands_glibcs_kept_heap_back_to_the_os():
    """After a large free glibc serves blocks below the new mmap threshold from its heap and keeps them
    when they are freed (at OLMoE-1B-7B's shape: 2 GiB after the load, ~0.5 GiB per new batch shape of
    CPU scoring). ``release_freed_memory`` gives them back."""
    from selectmoe.models.loading import release_freed_memory

    def anon_mib() -> float:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["RssAnon"].split()[0]) / 1024

    large = torch.ones(4 * 1024**2)  # a 16 MB block: mmap'd, and its free raises the threshold
    del large
    blocks = [torch.ones(1024**2) for _ in range(64)]  # 64 x 4 MB, now from the heap
    keep = blocks.pop()  # the heap's last block stays in use
    del blocks
    before = anon_mib()
    release_freed_memory()
    assert before - anon_mib() > 128  # of the 252 MiB freed
    assert keep.sum() == 1024**2


def test_new_gates_get_the_configured_seeded_init(olmoe_checkpoints):
    _, per_expert, _ = olmoe_checkpoints
    a = load_select_moe(str(per_expert), seed=7, quality_gate_init_mean=0.3, quality_gate_init_std=0.01)
    b = load_select_moe(str(per_expert), seed=7, quality_gate_init_mean=0.3, quality_gate_init_std=0.01)
    gate_a = a.model.layers[0].mlp.quality_gate.weight
    torch.testing.assert_close(gate_a, b.model.layers[0].mlp.quality_gate.weight)
    assert abs(gate_a.mean().item() - 0.3) < 0.01
    assert a.config.quality_gate_init_mean == 0.3


def test_convert_round_trip_and_auto_class(olmoe_checkpoints, tmp_path):
    _, per_expert, _ = olmoe_checkpoints
    from selectmoe.demo.tiny import build_tokenizer

    build_tokenizer(per_expert)
    out = convert_olmoe(str(per_expert), tmp_path / "converted", seed=1)
    assert max_logit_diff_gates_open(str(per_expert), str(out)) <= 1e-5
    converted = load_select_moe(str(out))
    auto = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(auto, SelectMoeForCausalLM)
    ids, _ = batch(bsz=2)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, auto(input_ids=ids).logits)
    # the gates saved by convert are the ones loaded back (not re-initialised)
    original = load_select_moe(str(per_expert), seed=1)
    torch.testing.assert_close(
        converted.model.layers[1].mlp.quality_gate.weight, original.model.layers[1].mlp.quality_gate.weight
    )


def test_grouped_mm_experts_match_eager():
    # Select-MoE reuses OLMoE's experts, so transformers' expert kernels can be selected for it too
    ids, mask = batch(bsz=3)
    logits = {}
    for impl in ("eager", "grouped_mm"):
        torch.manual_seed(0)
        model = SelectMoeForCausalLM._from_config(tiny_config(), experts_implementation=impl).eval()
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits["grouped_mm"], logits["eager"], atol=1e-5, rtol=1e-4)

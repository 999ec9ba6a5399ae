"""Real-shape costs on one GPU (issue 9): stage-2 scoring tokens/s and MFU, stage-1 and stage-3 step time
and peak memory, and a projection of the hours to score the LESS mix.

    .venv/bin/python benchmarks/gpu_scale.py                        # on an H100/H200 (< 8 min)
    .venv/bin/python benchmarks/gpu_scale.py --json gpu_scale.json  # also write the numbers
    .venv/bin/python benchmarks/gpu_scale.py --smoke                # tiny shapes, CPU or GPU, seconds (CI)

Models are randomly initialised (no download) in bf16 on the device:
  Select-MoE with OLMoE-1B-7B's shape (16 layers, hidden 2048, 64 experts top-8, expert intermediate 1024,
    vocab 50304; ~6.9B parameters, ~1.3B active per token)
  Llama-2-7B's shape (32 layers, hidden 4096, intermediate 11008, vocab 32000)
Phases:
  peak      best FLOP/s of a large bf16 matmul loop (the MFU denominator)
  scoring   stage 2's forward: decoder without LM head, router outputs on, per-row gate means
            (``selectmoe.select.score.layer_gate_means``), full rows of --score-seq tokens, --score-batch rows;
            once per experts implementation (--experts; the product runs grouped_mm, what
            ``from_pretrained`` gives, see ``common.set_experts``)
  stage1    the product's stage-1 step (``selectmoe.pretrain.worker``: ``setup_trainable`` +
            ``_train_step``, gradient checkpointing as stage 1 does, AdamW), full_rank and lora (r=16,
            routers), 1 row of --train-seq tokens, per experts implementation; peak memory from the
            model's creation to the last step
  fsdp      stage 1 full_rank under the product's FSDP2 units (``selectmoe.training.sharding.shard``) in a
            one-rank process group (NCCL on a GPU, gloo on CPU): units of mixed dtypes (bf16 body, fp32
            routers) all-gathered as bytes, then the checkpoint gather (``gather_state``) timed; before
            it, one all_reduce of --all-reduce-mb shows the backend starts and runs (with one rank it
            moves no data)
  stage3    a LoRA step on the Llama-2-7B shape (``selectmoe.finetune.worker.apply_lora``: LESS's r=128,
            alpha 512, dropout 0.1 on q/k/v/o, gradient checkpointing)
The projection divides rows x --mean-row-tokens by the best scoring tokens/s x --gpus.
A phase that fails (out of memory, a kernel missing) is reported as failed and the others still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch
from common import (
    LLAMA_2_7B,
    OLMOE_1B_7B,
    decoder_flops_per_row,
    matmul_peak,
    median,
    print_table,
    quiet_transformers,
    set_experts,
    timed,
    write_json,
)

LESS_ROWS = 270_679  # flan_v2 100,000 + cot 100,000 + dolly 15,011 + oasst1 55,668
# Mean template-encoded tokens per row of the LESS mix, estimated from /work/shared/data/train with the offline
# 32k tokenizer (2,000-row samples, max length 2048): flan_v2 248, cot 121, oasst1 444, and dolly (not in
# the shared data) taken as human_instructions' 150, weighted by the counts above: 236. OLMoE's 50k
# tokenizer gives somewhat fewer tokens for English text, so the projection errs long.
MEAN_ROW_TOKENS = 236
SEED_GB = {"stage1 full_rank": 16, "stage1 lora": 8, "stage3 llama lora": 24}  # the seed project's notes

TINY = dict(
    vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
)
SMOKE_OLMOE = dict(OLMOE_1B_7B, **TINY, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
SMOKE_LLAMA = dict(LLAMA_2_7B, **TINY, intermediate_size=128)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and few steps: checks the code, not speed"
    )
    p.add_argument("--experts", nargs="+", default=["eager", "grouped_mm"], help="experts implementations")
    p.add_argument("--score-batch", type=int, default=32, help="rows per scoring batch")
    p.add_argument("--score-seq", type=int, default=512, help="tokens per scoring row")
    p.add_argument("--train-seq", type=int, default=2048, help="tokens of the one row per training step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mean-row-tokens", type=float, default=MEAN_ROW_TOKENS)
    p.add_argument("--rows", type=int, default=LESS_ROWS, help="rows to score in the projection")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the projection")
    p.add_argument("--all-reduce-mb", type=int, default=1024, help="size of the fsdp phase's all_reduce")
    p.add_argument("--json", help="write the measured numbers here")
    args = p.parse_args()
    if args.smoke:
        args.score_batch, args.score_seq, args.train_seq = 4, 64, 64
        args.steps, args.warmup, args.all_reduce_mb = 2, 1, 1
    return args


# ---------------------------------------------------------------------------- device helpers


class Device:
    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.torch = torch.device("cuda" if self.cuda else "cpu")
        self.name = torch.cuda.get_device_name() if self.cuda else "CPU (no GPU)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None


def build(model_cls, config, device: Device):
    """A randomly initialised bf16 model created on the device (seeded)."""
    torch.manual_seed(0)
    with device.torch:
        return model_cls._from_config(config, dtype=torch.bfloat16)


def select_moe_config(shape: dict):
    from selectmoe.models.configuration import SelectMoeConfig

    return SelectMoeConfig(**shape)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def random_batch(config, rows: int, seq: int, device: Device) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (rows, seq), generator=generator)
    return {
        "input_ids": input_ids.to(device.torch),
        "attention_mask": torch.ones_like(input_ids).to(device.torch),
        "labels": input_ids.clone().to(device.torch),
    }


def median_time(fn, args, device: Device) -> float:
    for _ in range(args.warmup):
        fn()
    return median([timed(fn, device.sync) for _ in range(args.steps)])


# ---------------------------------------------------------------------------- phases


def phase_scoring(args, device: Device, shape: dict, peak: float) -> list[dict]:
    from selectmoe.models import SelectMoeForCausalLM
    from selectmoe.select.score import ScorePasses, score_batch

    config = select_moe_config(shape)
    model = build(SelectMoeForCausalLM, config, device).eval()
    batch = random_batch(config, args.score_batch, args.score_seq, device)
    rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in batch["input_ids"].cpu()]

    def score():  # the product's scoring pass (gates only, as preset=original scores)
        score_batch(model, rows, ScorePasses(), pad_token_id=0)

    tokens = args.score_batch * args.score_seq
    flops_per_token = decoder_flops_per_row(config, args.score_seq, lm_head=False) / args.score_seq
    results = []
    for experts in args.experts:
        set_experts(model, experts)
        device.reset_peak()  # peak = weights + this implementation's activations
        seconds = median_time(score, args, device)
        results.append(
            {
                "phase": f"stage2 scoring, experts {experts}",
                "scoring_experts": experts,
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": tokens / seconds * flops_per_token / peak,
                "peak_gb": device.peak_gb(),
            }
        )
    return results


def phase_stage1(args, device: Device, shape: dict, mode: str, experts: str) -> dict:
    import functools

    from selectmoe.data.collate import count_labelled
    from selectmoe.models import SelectMoeForCausalLM
    from selectmoe.pretrain.worker import _train_step, setup_trainable

    device.reset_peak()
    config = select_moe_config(shape)
    model = build(SelectMoeForCausalLM, config, device)
    set_experts(model, experts)
    model = setup_trainable(model, mode, {"r": 16, "lora_alpha": 64, "lora_dropout": 0.0})
    model.gradient_checkpointing_enable()
    model.train()
    batch = random_batch(config, 1, args.train_seq, device)
    step_tokens = count_labelled(batch["labels"][0].tolist())
    product_step = functools.partial(_train_step, coef=config.router_aux_loss_coef)
    return _training_result(
        f"stage1 {mode}, experts {experts}",
        model,
        lambda: product_step(model, [batch], step_tokens, 1),
        args,
        device,
        tokens=args.train_seq,
        seed_key=f"stage1 {mode}",
    )


def phase_fsdp(args, device: Device, shape: dict) -> dict:
    import torch.distributed as dist

    from selectmoe.data.collate import count_labelled
    from selectmoe.models import SelectMoeForCausalLM
    from selectmoe.pretrain.worker import _train_step, setup_trainable
    from selectmoe.training.sharding import gather_state, shard

    backend = "nccl" if device.cuda else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        all_reduce_s, ok = _all_reduce_check(args.all_reduce_mb, device)
        device.reset_peak()
        config = select_moe_config(shape)
        model = build(SelectMoeForCausalLM, config, device)
        set_experts(model, args.experts[-1])
        model = setup_trainable(model, "full_rank", {})
        model.gradient_checkpointing_enable()
        model = shard(model)
        model.train()
        batch = random_batch(config, 1, args.train_seq, device)
        step_tokens = count_labelled(batch["labels"][0].tolist())
        gathered = {}

        def gather(optimizer) -> None:
            started = time.perf_counter()
            trainable, _ = gather_state(model, optimizer)
            gathered["gather_s"] = time.perf_counter() - started
            gathered["gathered_params"] = sum(t.numel() for t in trainable.values())

        result = _training_result(
            f"stage1 full_rank FSDP2 ({backend}, 1 rank), experts {args.experts[-1]}",
            model,
            lambda: _train_step(model, [batch], step_tokens, 1, coef=config.router_aux_loss_coef),
            args,
            device,
            tokens=args.train_seq,
            seed_key="stage1 full_rank",
            after=gather,
        )
    finally:
        dist.destroy_process_group()
    return {
        **result,
        **gathered,
        "all_reduce_mb": args.all_reduce_mb,
        "all_reduce_s": all_reduce_s,
        "all_reduce_ok": ok,
    }


def _all_reduce_check(megabytes: int, device: Device) -> tuple[float, bool]:
    """(median seconds of an all_reduce of ``megabytes`` of bf16, whether the result is right)."""
    import torch.distributed as dist

    payload = torch.ones(megabytes * 2**19, dtype=torch.bfloat16, device=device.torch)
    seconds = median([timed(lambda: dist.all_reduce(payload), device.sync) for _ in range(3)])
    return seconds, bool((payload == 1).all())  # one rank: the sum is the tensor itself


def phase_stage3(args, device: Device, shape: dict) -> dict:
    from transformers import LlamaForCausalLM

    from selectmoe.data.collate import count_labelled
    from selectmoe.finetune.worker import _train_step, apply_lora

    device.reset_peak()
    config = llama_config(shape)
    model = build(LlamaForCausalLM, config, device)
    lora = {"r": 128, "lora_alpha": 512, "lora_dropout": 0.1, "target_modules": None}
    model = apply_lora(model, lora, gradient_checkpointing=True)
    model.train()
    batch = random_batch(config, 1, args.train_seq, device)
    step_tokens = count_labelled(batch["labels"][0].tolist())
    return _training_result(
        "stage3 llama-2-7b lora r=128",
        model,
        lambda: _train_step(model, [batch], step_tokens, 1),
        args,
        device,
        tokens=args.train_seq,
        seed_key="stage3 llama lora",
    )


def _training_result(
    name, model, backward, args, device: Device, *, tokens: int, seed_key: str, after=None
) -> dict:
    """Median seconds of an optimizer step; ``after(optimizer)`` runs once the steps are timed."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, args, device)
    if after is not None:
        after(optimizer)
    return {
        "phase": name,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "trainable_params": sum(p.numel() for p in params),
        "peak_gb": device.peak_gb(),
        "seed_gb": SEED_GB[seed_key],
    }


# ---------------------------------------------------------------------------- main


def run_phase(results: list[dict], name: str, fn) -> None:
    """Run one phase; a failure is recorded (and printed) instead of ending the benchmark."""
    start = time.perf_counter()
    try:
        produced = fn()
    except Exception as err:  # noqa: BLE001 - reported in the table, exit status 1 at the end
        traceback.print_exc()
        results.append({"phase": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
        return
    for row in produced if isinstance(produced, list) else [produced]:
        row["phase_wall_s"] = time.perf_counter() - start
        results.append(row)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _table_row(r: dict) -> list:
    return [
        r["phase"],
        r.get("step_s", "-"),
        r.get("tokens_per_s", "-"),
        f"{r['mfu']:.1%}" if "mfu" in r else "-",
        "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}",
        r.get("seed_gb", "-"),
        f"{r['trainable_params']:,}" if "trainable_params" in r else "-",
        r.get("error", ""),
    ]


def main() -> None:
    args = parse_args()
    quiet_transformers()
    device = Device()
    if not device.cuda and not args.smoke:
        raise SystemExit("gpu_scale.py needs a GPU for the real shapes; run with --smoke to check it on CPU")
    olmoe, llama = (SMOKE_OLMOE, SMOKE_LLAMA) if args.smoke else (OLMOE_1B_7B, LLAMA_2_7B)
    started = time.perf_counter()
    dtype = torch.bfloat16
    peak = matmul_peak(device.torch, dtype, 256 if args.smoke else 8192, seconds=1.0 if args.smoke else 10.0)
    print(f"device: {device.name}; measured bf16 matmul peak {peak / 1e12:.3f} TFLOP/s")

    results: list[dict] = []
    run_phase(results, "stage2 scoring", lambda: phase_scoring(args, device, olmoe, peak))
    for mode in ("full_rank", "lora"):
        for experts in args.experts:
            run_phase(
                results,
                f"stage1 {mode}, experts {experts}",
                lambda m=mode, e=experts: phase_stage1(args, device, olmoe, m, e),
            )
    run_phase(results, "stage1 full_rank FSDP2", lambda: phase_fsdp(args, device, olmoe))
    run_phase(results, "stage3 llama-2-7b lora r=128", lambda: phase_stage3(args, device, llama))

    smoke = " (SMOKE: tiny shapes, checks the code, measures nothing)" if args.smoke else ""
    print_table(
        f"{device.name}: bf16, random weights; scoring {args.score_batch} x {args.score_seq} tokens, "
        f"training 1 x {args.train_seq} tokens{smoke}",
        ["phase", "step s", "tokens/s", "MFU", "peak GB", "seed GB", "trainable params", "error"],
        [_table_row(r) for r in results],
    )
    for r in results:
        if "gather_s" in r:
            print(
                f"{r['phase']}: all_reduce of {r['all_reduce_mb']} MB {r['all_reduce_s'] * 1000:.1f} ms "
                f"(result {'right' if r['all_reduce_ok'] else 'WRONG'}); checkpoint gather of "
                f"{r['gathered_params']:,} trainable parameters {r['gather_s']:.2f} s"
            )
    scoring = {r["scoring_experts"]: r for r in results if "scoring_experts" in r}
    if "eager" in scoring and "grouped_mm" in scoring:
        ratio = scoring["grouped_mm"]["tokens_per_s"] / scoring["eager"]["tokens_per_s"]
        print(f"ratio scoring tokens/s grouped_mm / eager: {ratio:.2f}x")
    projection = {}
    for experts, r in scoring.items():
        hours = args.rows * args.mean_row_tokens / (r["tokens_per_s"] * args.gpus) / 3600
        projection[experts] = hours
        print(
            f"{'SMOKE (meaningless) ' if args.smoke else ''}projection: {args.rows:,} rows x {args.mean_row_tokens:.0f} tokens on {args.gpus} x {device.name}, "
            f"experts {experts}: {hours:.2f} h ({hours * 60:.1f} min)"
        )
    print(
        "note: the projection assumes the measured per-GPU rate on full rows holds for length-sorted real "
        "rows and that reading, tokenising and writing keep up; random weights route tokens about evenly, "
        "a trained router less so"
    )
    wall = time.perf_counter() - started
    print(f"total wall time {wall:.0f} s")
    write_json(
        args.json,
        {
            "device": device.name,
            "peak_flops": peak,
            "args": vars(args),
            "results": results,
            "projection_hours": projection,
            "wall_s": wall,
        },
    )
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

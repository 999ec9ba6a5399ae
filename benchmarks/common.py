"""Helpers shared by the benchmark scripts (imported as ``common``: the scripts run from this folder).

Real rows, the tiny model, timing, FLOP counting, the measured matmul peak and the printed tables.
Nothing here is timed itself.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

TRAIN_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
EVAL_DIR = TRAIN_DIR.parent / "eval"
# OLMoE-1B-7B's shape as SelectMoeConfig fields (~6.9B parameters, ~1.3B active per token)
OLMOE_1B_7B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
    tie_word_embeddings=False,
)
# Llama-2-7B's shape (6.74B parameters)
LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


# ---------------------------------------------------------------------------- real rows


def sample_rows(data_dir: Path, n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` lines from all ``*.jsonl`` files of ``data_dir``, in corpus order, through the
    product's normaliser (``dataset``, ``id``, ``messages``); lines it rejects are left out."""
    from selectmoe.data import RowError, normalize_record

    lines = []
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        # split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028
        lines += [(path.stem, line) for line in path.read_text().split("\n") if line.strip()]
    rows = []
    for i in sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines)))):
        try:
            row = normalize_record(json.loads(lines[i][1]), default_dataset=lines[i][0])
        except RowError:
            continue
        rows.append({key: row[key] for key in ("dataset", "id", "messages")})
    return rows


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Rows through the product's chat template; rows the template rejects are left out."""
    from selectmoe.data.template import encode_batch

    encoded = encode_batch([r["messages"] for r in rows], tokenizer, max_seq_length=max_length)
    return [
        {"id": row["id"], "dataset": row["dataset"], "input_ids": e["input_ids"], "labels": e["labels"]}
        for row, e in zip(rows, encoded)
        if isinstance(e, dict)
    ]


def base_lm_and_replies(model_dir: Path, rows: list[dict], max_length: int):
    """A plain LM (fp32, eval) and its tokenizer from ``model_dir``, and the rows the chat template accepts
    as (index in ``rows``, encoding, the reply encoded alone: the product's unprompted side) triples."""
    from transformers import AutoModelForCausalLM

    from selectmoe.data import encode_replies_alone, ensure_pad_token
    from selectmoe.data.template import encode_batch, load_tokenizer

    tokenizer = ensure_pad_token(load_tokenizer(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    encoded = encode_batch([r["messages"] for r in rows], tokenizer, max_seq_length=max_length)
    accepted = [i for i, e in enumerate(encoded) if isinstance(e, dict)]
    replies = encode_replies_alone(
        [rows[i]["messages"] for i in accepted],
        tokenizer,
        max_seq_length=max_length,
        n_assistant_tokens=[encoded[i]["n_assistant_tokens"] for i in accepted],
    )
    return model, tokenizer, [(i, encoded[i], reply) for i, reply in zip(accepted, replies)]


def lm_pretrained_tiny(
    kind: str,
    seed: int,
    lm_rows: list[dict],
    steps: int,
    max_length: int,
    cache: Path,
    tokenizer_vocab: int | None = None,
    **config_overrides,
) -> Path:
    """The tiny ``olmoe`` (a selector) or ``llama`` (a target) LM-pretrained ``steps`` steps on ``lm_rows``;
    cached in ``cache`` by its recipe. With ``tokenizer_vocab`` its tokenizer is a byte-level BPE of that
    size trained on ``lm_rows`` (as the demo's models), else the 32k one."""
    from selectmoe.demo.tiny import build_tiny_llama, build_tiny_olmoe, pretrain_tiny_lm, train_tokenizer
    from selectmoe.manifest import hash_dict

    recipe = {"seed": seed, "steps": steps, "model": config_overrides, "ids": [r["id"] for r in lm_rows]}
    if tokenizer_vocab:
        recipe["tokenizer_vocab"] = tokenizer_vocab
    key = hash_dict(recipe if kind == "olmoe" else {**recipe, "kind": kind})
    out = cache / (f"base_{key}" if kind == "olmoe" else f"{kind}_{key}")
    if not (out / "config.json").exists():
        build = {"olmoe": build_tiny_olmoe, "llama": build_tiny_llama}[kind]
        messages = [r["messages"] for r in lm_rows]
        tokenizer = train_tokenizer(messages, tokenizer_vocab) if tokenizer_vocab else None
        init = build(cache / f"init_{key}", seed=seed, tokenizer=tokenizer, **config_overrides)
        pretrain_tiny_lm(init, messages, out, steps=steps, seed=seed, max_seq_length=max_length)
    return out


# ---------------------------------------------------------------------------- timing


PEAK_PROBE_SIZE = 256  # matmul_peak times one of these first, to size its own


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of ``fn`` takes (``sync`` waits for queued device work before and after)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------- models


def quiet_transformers() -> None:
    """No load reports, progress bars or deprecation notices from transformers in the benchmark output."""
    import warnings

    from transformers.utils import logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def quiet_ray(dashboard: bool = False) -> None:
    """A local Ray without worker log forwarding or Ray Data progress output. Runs that start several
    Ray Train runs one after the other want the ``dashboard`` (see ``selectmoe.scaling.start_local_ray``)."""
    import logging

    import ray

    from selectmoe.scaling import start_local_ray

    if dashboard:
        start_local_ray(log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def set_experts(model, implementation: str) -> None:
    """Run ``model``'s MoE experts with ``implementation`` (``eager`` | ``grouped_mm`` | ``batched_mm``)."""
    model.set_experts_implementation(implementation)


# ---------------------------------------------------------------------------- FLOPs


def decoder_flops_per_row(config, length: int, lm_head: bool) -> float:
    """Forward FLOPs (2 per multiply-add) of an OLMoE / Select-MoE decoder on one row of ``length``
    real tokens: attention projections, causal attention, router, quality gate, the top-k experts,
    and the LM head when ``lm_head``. Norms, rotary embeddings and softmax are left out (< 1%)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_token = 2 * h * (h + 2 * kv + h)  # q, k, v, o
    per_token += 2 * h * config.num_experts + 2 * h  # MoE router + quality gate
    per_token += config.num_experts_per_tok * 2 * 3 * h * config.intermediate_size  # gate_up + down
    attention = 2 * 2 * h * length * (length + 1) / 2  # scores + weighted values, causal
    total = layers * (length * per_token + attention)
    if lm_head:
        total += length * 2 * h * config.vocab_size
    return float(total)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls over about ``seconds`` (the machine's practical peak).
    ``size`` is halved while the speed of a ``PEAK_PROBE_SIZE`` matmul predicts that one ``size`` matmul
    takes over a tenth of ``seconds`` (bf16 on a CPU without bf16 instructions is emulated and slow)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    probe_a, probe_b = operands(PEAK_PROBE_SIZE)
    probe_a @ probe_b  # warm-up
    probe_s = timed(lambda: probe_a @ probe_b, sync)
    while size > PEAK_PROBE_SIZE and probe_s * (size / PEAK_PROBE_SIZE) ** 3 > seconds / 10:
        size //= 2
    a, b = operands(size)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        elapsed = timed(lambda: [a @ b for _ in range(4)], sync)
        best = max(best, 4 * 2 * size**3 / elapsed)
    return best


# ---------------------------------------------------------------------------- output


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        print(f"\nwrote {path}")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

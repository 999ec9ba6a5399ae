"""Stage 1 driver: ``selectmoe pretrain`` / ``python -m ray_jobs.pretrain``.

setup (Ray, rows, tokens) -> train (Ray Train ``TorchTrainer``; the per-worker model and step in
``selectmoe.pretrain.worker``, the shared loop in ``selectmoe.training.loop``) -> save (router
weights or LoRA adapter, ``select_moe_config.json``, tokenizer, metrics, plot, manifest). Rerunning
with the same config and ``output_dir`` resumes from the last checkpoint; a worker failure restarts
from it (``scaling.max_failures``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selectmoe.config import ConfigError, DatasetConfig, PretrainConfig, to_dict
from selectmoe.console import phase
from selectmoe.figures import plot_training_curves
from selectmoe.layout import (
    ADAPTER_DIR,
    METRICS,
    REFERENCE_REJECTS,
    REJECTS,
    ROUTER_WEIGHTS,
    STAGE1_CONFIG,
    TOKENIZER_DIR,
    TRAINABLE_FILE,
    TRAINING_CURVES,
    TRAINING_IDS,
)
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.models.loading import require_model
from selectmoe.pretrain.worker import train_router_per_worker
from selectmoe.ray_data import mix_reference, read_rows, tokenize_rows
from selectmoe.scaling import worker_layout
from selectmoe.training.launch import fit, loop_config, plan_steps, run_name

logger = logging.getLogger(__name__)


def select_moe_overrides(cfg: PretrainConfig) -> dict:
    """The SelectMoeConfig fields stage 1 sets (the seed's keys, mapped onto the model config)."""
    t = cfg.training
    return {
        "quality_gate_init_mean": t.quality_gate_init_mean,
        "quality_gate_init_std": t.quality_gate_init_std,
        "quality_loss_weight": t.quality_loss_weight,
        "trash_expert_mode": t.trash_expert_mode,
        "enable_load_balancing": t.enable_load_balancing,
        "quality_loss_type": t.quality_loss_type,
        "quality_loss_debug": t.quality_loss_debug,
        "quality_loss_tokens": t.quality_loss_tokens,
        "router_aux_loss_coef": t.router_aux_loss_coef,
        **to_dict(t.quality_loss_params),
    }


def pretrain(cfg: PretrainConfig, callbacks: list | None = None) -> Path:
    """Stage 1; ``callbacks`` are Ray Train ``UserCallback``s (the sweep passes Tune's reporter)."""
    started = time.time()
    if cfg.training.peft_mode == "lora" and cfg.training.lora.lora_dropout != 0:
        raise ConfigError(
            "training.lora.lora_dropout must be 0 in stage 1: the MoE router is a bare weight, and PEFT's "
            "LoRA on parameters (target_parameters) has no dropout"
        )
    require_model("selector_model.path", cfg.selector_model.path)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_name = cfg.selector_model.tokenizer_name or cfg.selector_model.path

    # ---- setup: rows -> tokens (materialised: the sampled subset is small and read by every worker)
    with phase("stage 1 pretrain: reading, checking and tokenising rows"):
        read = read_rows(cfg.dataset, cfg.data, seed=cfg.seed, tokenizer_name=tokenizer_name)
        read.ledger.write_rejects(out / REJECTS)
        train = tokenize_rows(read.rows, tokenizer_name, cfg.dataset.max_sequence_length, cfg.data.loss_on)
        train = train.materialize()
        trained = pa.Table.from_pylist(train.select_columns(["id", "dataset"]).take_all())
        pq.write_table(trained, out / TRAINING_IDS)  # corpus rows only: stage 2 excludes them
        trained_ids = set(trained["id"].to_pylist()) if trained.num_rows else set()
        reference_rows = 0
        if cfg.training.reference_data:
            reference = _reference_rows(cfg, tokenizer_name, out)
            reference_rows = reference.count()
            train = mix_reference(train, reference, cfg.seed).materialize()
        num_rows = train.count()

    layout = worker_layout(cfg.scaling)
    steps = plan_steps("stage 1", num_rows, cfg.training, workers=layout.workers)

    # ---- train
    t = cfg.training
    config = loop_config(cfg, steps, pad_token_id=_pad_token_id(tokenizer_name), output_dir=out)
    config.update(
        base_model=cfg.selector_model.path,
        dtype=cfg.selector_model.dtype,
        attn_implementation=cfg.selector_model.attn_implementation,
        select_moe=select_moe_overrides(cfg),
        peft_mode=t.peft_mode,
        probe=probe_rows(cfg, tokenizer_name, trained_ids) if t.probe_labels else None,
        probe_every_steps=t.probe_every_steps,
        reference_class_weights=_class_weights(num_rows, reference_rows) if reference_rows else None,
        reference_loss_weight=t.reference_loss_weight,
    )
    with phase(f"stage 1 pretrain: training {steps.total_steps} steps on {layout.workers} worker(s)"):
        result = fit(
            train_router_per_worker,
            config,
            train,
            name=run_name("pretrain", cfg),
            output_dir=out,
            scaling=cfg.scaling,
            layout=layout,
            callbacks=callbacks,
        )

    # ---- save
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        if t.peft_mode == "lora":
            shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
            shutil.copytree(ckpt / ADAPTER_DIR, out / ADAPTER_DIR)
        else:
            shutil.copy(ckpt / TRAINABLE_FILE, out / ROUTER_WEIGHTS)
        shutil.copy(ckpt / METRICS, out / METRICS)
    (out / STAGE1_CONFIG).write_text(
        json.dumps(
            {
                "base_model": cfg.selector_model.path,
                "tokenizer": tokenizer_name,
                "peft_mode": t.peft_mode,
                "weights": ADAPTER_DIR if t.peft_mode == "lora" else ROUTER_WEIGHTS,
                "select_moe": select_moe_overrides(cfg),
                "seed": cfg.seed,
            },
            indent=2,
        )
    )
    _save_tokenizer(tokenizer_name, out / TOKENIZER_DIR)
    history = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line]
    plot_training_curves(history, out / TRAINING_CURVES, title="stage 1: router pretraining")
    counts = read.ledger.counts()
    counts.update(
        rows_trained=num_rows,
        reference_rows_trained=reference_rows,
        steps=steps.total_steps,
        effective_batch=steps.batch.effective_batch,
        workers=steps.batch.world_size,
    )
    write_manifest(
        out,
        stage="pretrain",
        config=cfg,
        inputs={
            "selector_model": fingerprint(cfg.selector_model.path),
            "data": [fingerprint(s.uri) for s in read.sources],
        },
        counts=counts,
        metrics={**history[-1], **probe_verdict(history[-1])} if history else {},
        outputs={
            "weights": ADAPTER_DIR if t.peft_mode == "lora" else ROUTER_WEIGHTS,
            "config": STAGE1_CONFIG,
        },
        started_at=started,
    )
    return out


def probe_verdict(last: dict) -> dict:
    """With a probe: the gates' direction on the labelled rows at the last step, checked, never assumed
    (the rank-biserial correlation 2 x AUROC - 1 of the row score with "clean")."""
    if last.get("probe_auroc") is None or last["probe_auroc"] != last["probe_auroc"]:  # none, or nan
        return {}
    correlation = 2 * last["probe_auroc"] - 1
    return {
        "gate_quality_correlation": correlation,
        "gate_direction": "inverted: the gates rank defective rows above clean ones"
        if correlation < 0
        else "aligned: the gates rank clean rows above defective ones",
    }


def probe_rows(cfg: PretrainConfig, tokenizer_name: str, trained_ids: set[str]) -> list[dict]:
    """Up to ``training.probe_rows`` labelled corpus rows that stage 1 does not train on, tokenised:
    a seeded choice (by a hash of the id, so independent of file order)."""
    from selectmoe.data.ledger import RowLedger
    from selectmoe.data.rows import iter_rows
    from selectmoe.data.subset import random_key
    from selectmoe.data.template import encode_batch, load_tokenizer

    lines = Path(cfg.training.probe_labels).read_text().splitlines()
    labels = {r["id"]: r.get("defect") or "" for r in map(json.loads, lines)}
    ledger = RowLedger(on_bad_row="skip", subset_ratio=1.0, seed=cfg.seed)
    candidates = [
        r for r in iter_rows(cfg.dataset, ledger) if r["id"] in labels and r["id"] not in trained_ids
    ]
    if not candidates:
        raise ConfigError(
            f"training.probe_labels={cfg.training.probe_labels}: no labelled row outside the training subset"
        )
    keys = random_key(cfg.seed, pa.array([r["id"] for r in candidates])).to_pylist()
    chosen = [r for _, r in sorted(zip(keys, candidates), key=lambda x: x[0])][: cfg.training.probe_rows]
    encoded = encode_batch(
        [r["messages"] for r in chosen],
        load_tokenizer(tokenizer_name),
        max_seq_length=cfg.dataset.max_sequence_length,
    )
    return [
        {"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist(), "clean": labels[r["id"]] == ""}
        for r, e in zip(chosen, encoded)
        if isinstance(e, dict)
    ]


def _reference_rows(cfg: PretrainConfig, tokenizer_name: str, out: Path):
    """The trusted rows of ``training.reference_data``, read and tokenised like the corpus (all of them;
    their rejects in ``layout.REFERENCE_REJECTS``)."""
    source = DatasetConfig(
        data_path=list(cfg.training.reference_data), max_sequence_length=cfg.dataset.max_sequence_length
    )
    read = read_rows(source, cfg.data, seed=cfg.seed, tokenizer_name=tokenizer_name)
    read.ledger.write_rejects(out / REFERENCE_REJECTS)
    rows = tokenize_rows(read.rows, tokenizer_name, cfg.dataset.max_sequence_length, cfg.data.loss_on)
    rows = rows.materialize()
    if rows.count() == 0:
        raise ConfigError(f"training.reference_data={cfg.training.reference_data}: no valid row")
    return rows


def _class_weights(num_rows: int, reference_rows: int) -> dict[str, float]:
    """Per-row BCE weights that give reference and corpus rows equal total weight (mean weight 1)."""
    corpus_rows = num_rows - reference_rows
    if corpus_rows == 0:
        raise ConfigError("training.reference_data: stage 1 needs corpus rows besides the reference rows")
    return {"reference": num_rows / (2 * reference_rows), "corpus": num_rows / (2 * corpus_rows)}


def _pad_token_id(tokenizer_name: str) -> int:
    from selectmoe.data.template import ensure_pad_token, load_tokenizer

    return ensure_pad_token(load_tokenizer(tokenizer_name)).pad_token_id


def _save_tokenizer(tokenizer_name: str, path: Path) -> None:
    from selectmoe.data.template import load_tokenizer

    load_tokenizer(tokenizer_name).save_pretrained(str(path))

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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from selectmoe.config import ConfigError, DatasetConfig, PretrainConfig, to_dict
from selectmoe.console import phase
from selectmoe.data.subset import random_key
from selectmoe.figures import plot_training_curves
from selectmoe.layout import (
    ADAPTER_DIR,
    METRICS,
    REFERENCE_REJECTS,
    REJECTS,
    ROUTER_WEIGHTS,
    ROWS_SCRATCH,
    STAGE1_CONFIG,
    TOKENIZER_DIR,
    TRAINABLE_FILE,
    TRAINING_CURVES,
    TRAINING_IDS,
    TRUSTED_ROWS_SCRATCH,
)
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.models.loading import require_model
from selectmoe.pretrain.worker import train_router_per_worker
from selectmoe.ray_data import RowsRead, mix_reference, read_tokenized, scratch_removed
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
    with scratch_removed(Path(cfg.output_dir).resolve()):
        return _run(cfg, callbacks)


def _run(cfg: PretrainConfig, callbacks: list | None) -> Path:
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

    # ---- setup: rows -> tokens, in one read (materialised: the sampled subset is small and read by
    # every worker)
    with phase("stage 1 pretrain: reading, checking and tokenising rows"):
        read = read_tokenized(
            cfg.dataset,
            cfg.data,
            seed=cfg.seed,
            tokenizer_name=tokenizer_name,
            rows_dir=out / ROWS_SCRATCH,
            loss_on=cfg.data.loss_on,
        )
        read.ledger.write_rejects(out / REJECTS)
        train = read.rows
        _write_training_ids(train, out / TRAINING_IDS)  # corpus rows only: stage 2 excludes them
        reference_rows, reference_probe = 0, None
        if cfg.training.reference_data:
            reference, held_out = _reference_rows(cfg, tokenizer_name, out, _reference_holdout(cfg, read))
            reference_rows = reference.count()
            train = mix_reference(train, reference, cfg.seed).materialize()
            if held_out:
                reference_probe = reference_probe_rows(cfg, tokenizer_name, read, held_out)
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
        probe=probe_rows(cfg, tokenizer_name, read) if t.probe_labels else None,
        reference_probe=reference_probe,
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
        reference_rows_held_out=sum(r["clean"] for r in reference_probe) if reference_probe else 0,
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


PROBES = (  # (metrics key, what it compares, the rows it ranks first when aligned, the others)
    ("probe_auroc", "labelled probe rows", "clean rows", "defective ones"),
    ("probe_reference_auroc", "held-out trusted rows vs corpus rows", "held-out trusted rows", "corpus rows"),
)


def probe_verdict(last: dict) -> dict:
    """With a probe: the gates' direction at the last step, checked, never assumed (the rank-biserial
    correlation 2 x AUROC - 1 of the row score with "clean", or with "trusted"); labels win over a
    trusted set when both are given."""
    for key, source, first, second in PROBES:
        value = last.get(key)
        if value is None or value != value:  # none, or nan
            continue
        correlation = 2 * value - 1
        above, below = (first, second) if correlation >= 0 else (second, first)
        return {
            "gate_quality_correlation": correlation,
            "gate_direction_from": source,
            "gate_direction": f"{'inverted' if correlation < 0 else 'aligned'}: the gates rank {above} "
            f"above {below}",
        }
    return {}


def probe_rows(cfg: PretrainConfig, tokenizer_name: str, read: RowsRead) -> list[dict]:
    """Up to ``training.probe_rows`` labelled corpus rows that stage 1 does not train on, tokenised."""
    lines = Path(cfg.training.probe_labels).read_text().splitlines()
    labels = {r["id"]: r.get("defect") or "" for r in map(json.loads, lines)}
    chosen = _untrained_rows(cfg, read, ids=pa.array(list(labels), pa.string()))
    if not chosen:
        raise ConfigError(
            f"training.probe_labels={cfg.training.probe_labels}: no labelled row outside the training subset"
        )
    return _probe_encoded(cfg, tokenizer_name, chosen, [labels[r["id"]] == "" for r in chosen])


def reference_probe_rows(
    cfg: PretrainConfig, tokenizer_name: str, read: RowsRead, held_out: list[dict]
) -> list[dict] | None:
    """The held-out reference rows (positives) and up to ``training.probe_rows`` corpus rows stage 1
    does not train on."""
    # a seeded sample of ~4x the rows kept, so that the read returns few rows to the driver
    share = min(1.0, 4 * cfg.training.probe_rows / max(1, _untrained_count(read)))
    corpus = _untrained_rows(cfg, read, key_below=share)
    return held_out + _probe_encoded(cfg, tokenizer_name, corpus, [False] * len(corpus))


def _untrained_count(read: RowsRead) -> int:
    counts = read.ledger.counts()
    return counts["rows_accepted"] - counts["rows_sampled"]


def _write_training_ids(rows, path: Path) -> None:
    """The ``id`` and ``dataset`` of ``rows`` (a Ray Dataset) into ``path``, batch by batch: the driver
    never holds every id of the subset."""
    schema = pa.schema([("id", pa.string()), ("dataset", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in rows.select_columns(["id", "dataset"]).iter_batches(batch_format="pyarrow"):
            writer.write_table(batch.select(["id", "dataset"]).cast(schema))


def _reference_holdout(cfg: PretrainConfig, read: RowsRead) -> float:
    """``training.reference_holdout``, or 0 (all reference rows trained on, and a warning) when stage 1
    trains on every corpus row, leaving none to rank the held-out ones against."""
    if cfg.training.reference_holdout and _untrained_count(read) == 0:
        logger.warning(
            "training.reference_holdout=%s: every corpus row is trained on (dataset.subset_ratio=1), so no "
            "reference row is held out and there is no probe_reference_auroc",
            cfg.training.reference_holdout,
        )
        return 0.0
    return cfg.training.reference_holdout


def _untrained_rows(cfg: PretrainConfig, read: RowsRead, **which) -> list[dict]:
    """Up to ``training.probe_rows`` of the rows ``read.outside_subset(**which)`` returns (rows stage 1
    does not train on, read by Ray tasks), the smallest ``random_key`` first: a seeded choice,
    independent of file order."""
    rows = read.outside_subset(**which).take_all()
    if not rows:
        return []
    keys = random_key(cfg.seed, pa.array([r["id"] for r in rows])).to_pylist()
    return [r for _, r in sorted(zip(keys, rows), key=lambda x: x[0])][: cfg.training.probe_rows]


def _probe_encoded(
    cfg: PretrainConfig, tokenizer_name: str, rows: list[dict], clean: list[bool]
) -> list[dict]:
    from selectmoe.data.template import encode_batch, load_tokenizer

    encoded = encode_batch(
        [r["messages"] for r in rows],
        load_tokenizer(tokenizer_name),
        max_seq_length=cfg.dataset.max_sequence_length,
    )
    return [
        {"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist(), "clean": c}
        for c, e in zip(clean, encoded)
        if isinstance(e, dict)
    ]


def _reference_rows(
    cfg: PretrainConfig, tokenizer_name: str, out: Path, holdout: float
) -> tuple[ray.data.Dataset, list[dict]]:
    """The trusted rows of ``training.reference_data``, read and tokenised like the corpus (their rejects
    in ``layout.REFERENCE_REJECTS``): the rows to train on, and the ``holdout`` share (a seeded hash of
    the id) kept out as probe rows (``clean``: trusted)."""
    source = DatasetConfig(
        data_path=list(cfg.training.reference_data), max_sequence_length=cfg.dataset.max_sequence_length
    )
    read = read_tokenized(
        source,
        cfg.data,
        seed=cfg.seed,
        tokenizer_name=tokenizer_name,
        rows_dir=out / TRUSTED_ROWS_SCRATCH,
        loss_on=cfg.data.loss_on,
    )
    read.ledger.write_rejects(out / REFERENCE_REJECTS)
    tables = ray.get(read.rows.to_arrow_refs())
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ConfigError(f"training.reference_data={cfg.training.reference_data}: no valid row")
    held = pc.less(random_key(cfg.seed, table["id"]), holdout)
    train = table.filter(pc.invert(held))
    if train.num_rows == 0:
        raise ConfigError(
            f"training.reference_holdout={holdout} leaves none of the {table.num_rows} reference rows to train on"
        )
    held_out = [
        {"input_ids": r["input_ids"], "labels": r["labels"], "clean": True}
        for r in table.filter(held).select(["input_ids", "labels"]).to_pylist()
    ]
    return ray.data.from_arrow(train), held_out


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

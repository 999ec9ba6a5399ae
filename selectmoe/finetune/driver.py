"""Stage 3 driver: ``selectmoe finetune`` / ``python -m ray_jobs.finetune``.

LoRA-finetune the target model (``model.name``, Llama-2-7B by default) on the selected rows with LESS's
recipe, on Ray Train::

    selectmoe finetune dataset.data_path=outputs/stage_2_select/selected.jsonl        # local Ray
    selectmoe finetune dataset.data_path=... model.name=/models/tiny training.batch_size=8  # CPU smoke run
    ray job submit --working-dir . -- python -m ray_jobs.finetune dataset.data_path=s3://.../selected.jsonl

setup (Ray, rows -> template tokens with assistant-only labels) -> train (``TorchTrainer``; the
per-worker model and step in ``selectmoe.finetune.worker``, the shared loop in
``selectmoe.training.loop``) -> save. ``output_dir`` ends up a PEFT adapter folder that also holds the
tokenizer, so ``PeftModel.from_pretrained(base, output_dir)`` and stage 4's ``eval.adapter=output_dir``
read it; beside it ``metrics.jsonl``, ``training_curves.png``, ``rejects.jsonl``, ``manifest.json``
and ``config.yaml``. Rerunning the same config into the same ``output_dir`` resumes from the last
checkpoint (``output_dir/ray_train``); a worker failure restarts from it (``scaling.max_failures``).

Padding: a tokenizer without a pad token pads with its unk (else eos) token
(``ensure_pad_token``) instead of adding a ``<pad>`` token as LESS does. Padding never carries loss
or attention, so the choice does not change training, and the vocabulary stays the base model's:
the adapter holds no resized embeddings and loads onto the unmodified base.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from selectmoe.config import FinetuneConfig
from selectmoe.console import phase
from selectmoe.data.template import ensure_pad_token, load_tokenizer
from selectmoe.figures import plot_training_curves
from selectmoe.finetune.worker import train_target_per_worker
from selectmoe.layout import ADAPTER_DIR, METRICS, REJECTS, ROWS_SCRATCH, TRAINING_CURVES
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.models.loading import require_model
from selectmoe.ray_data import read_tokenized, scratch_removed
from selectmoe.scaling import worker_layout
from selectmoe.training.launch import fit, loop_config, plan_steps, run_name

logger = logging.getLogger(__name__)


def finetune(cfg: FinetuneConfig) -> Path:
    """Run stage 3; returns ``output_dir`` (the adapter folder)."""
    with scratch_removed(Path(cfg.output_dir).resolve()):
        return _run(cfg)


def _run(cfg: FinetuneConfig) -> Path:
    started = time.time()
    require_model("model.name", cfg.model.name)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_name = cfg.model.tokenizer_name or cfg.model.name
    tokenizer = ensure_pad_token(load_tokenizer(tokenizer_name))

    # ---- setup: rows -> tokens, in one read (materialised: every worker reads the whole selection)
    with phase("stage 3 finetune: reading and tokenising rows"):
        read = read_training_rows(cfg, tokenizer_name, out / ROWS_SCRATCH)
        read.ledger.write_rejects(out / REJECTS)
        train = read.rows
        num_rows = train.count()
    layout = worker_layout(cfg.scaling)
    steps = plan_steps("stage 3", num_rows, cfg.training, workers=layout.workers)

    # ---- train
    config = loop_config(cfg, steps, pad_token_id=tokenizer.pad_token_id, output_dir=out)
    config.update(
        model_name=cfg.model.name,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    with phase(f"stage 3 finetune: training {steps.total_steps} steps on {layout.workers} worker(s)"):
        result = fit(
            train_target_per_worker,
            config,
            train,
            name=run_name("finetune", cfg),
            output_dir=out,
            scaling=cfg.scaling,
            layout=layout,
        )

    # ---- save: the adapter and its tokenizer at the top of output_dir
    with result.checkpoint.as_directory() as ckpt:
        for path in (Path(ckpt) / ADAPTER_DIR).iterdir():
            shutil.copy(path, out / path.name)
        shutil.copy(Path(ckpt) / METRICS, out / METRICS)
    tokenizer.save_pretrained(str(out))
    history = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line]
    plot_training_curves(history, out / TRAINING_CURVES, title="stage 3: LoRA finetuning")
    counts = read.ledger.counts()
    counts.update(
        rows_trained=num_rows,
        steps=steps.total_steps,
        steps_per_epoch=steps.steps_per_epoch,
        batch_size=cfg.training.batch_size,
        effective_batch=steps.batch.effective_batch,
        per_device_batch_size=steps.batch.per_device,
        gradient_accumulation=steps.batch.accumulation,
        workers=steps.batch.world_size,
    )
    write_manifest(
        out,
        stage="finetune",
        config=cfg,
        inputs={
            "model": fingerprint(cfg.model.name),
            "data": [fingerprint(s.uri) for s in read.sources],
        },
        counts=counts,
        metrics={"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "last": history[-1]},
        outputs={"adapter": "adapter_model.safetensors", "metrics": METRICS},
        started_at=started,
    )
    logger.info("stage 3: adapter, tokenizer and manifest in %s", out)
    return out


def read_training_rows(cfg: FinetuneConfig, tokenizer_name: str, rows_dir: Path):
    """``read_tokenized``: the rows with the template's ``input_ids`` + ``labels`` (``data.loss_on``:
    assistant tokens by default), the scan's parts in the scratch ``rows_dir``."""
    return read_tokenized(
        cfg.dataset,
        cfg.data,
        seed=cfg.seed,
        tokenizer_name=tokenizer_name,
        rows_dir=rows_dir,
        loss_on=cfg.data.loss_on,
    )

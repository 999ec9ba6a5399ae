"""``selectmoe validate-data``: the pre-flight check of a training corpus.

Reads ``dataset.data_path`` (or ``dataset.data_dir`` + ``dataset.dataset_names``) through Ray
Data exactly as the stages will, and writes into ``output_dir``:

- ``rows/``: the accepted rows (subset applied) as Parquet, schema ``selectmoe.ray_data.ROW_SCHEMA``,
  one ``part-<piece>.parquet`` per piece of the input that has rows, in source order by name (written
  by the scan itself: the text is read once);
- ``rejects.jsonl``: one ``{"source", "line", "reason", "raw"}`` per rejected row;
- ``manifest.json``: counts (rows read = accepted + rejected, per dataset, rejects by reason and
  file) and, with ``tokenizer_name``, token-length percentiles of the template text.

Local CPU:  ``selectmoe validate-data dataset.data_path=../shared/data/train output_dir=outputs/validate``
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from selectmoe.config import ValidateDataConfig
from selectmoe.console import phase
from selectmoe.layout import REJECTS, ROWS_DIR
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.ray_data import read_rows


def validate_data(cfg: ValidateDataConfig) -> Path:
    """Write rows/, rejects.jsonl and manifest.json; return the output folder."""
    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_dir = out / ROWS_DIR
    shutil.rmtree(rows_dir, ignore_errors=True)  # a rerun replaces the rows, never appends
    rows_dir.mkdir()
    with phase("validate-data: reading, checking and writing the rows"):
        try:
            result = read_rows(
                cfg.dataset, cfg.data, seed=cfg.seed, tokenizer_name=cfg.tokenizer_name, rows_dir=rows_dir
            )
        except BaseException:
            shutil.rmtree(rows_dir, ignore_errors=True)  # no half-written rows/ (on_bad_row=error)
            raise
    with phase("validate-data: writing the rejects"):
        result.ledger.write_rejects(out / REJECTS)

    metrics = {}
    if cfg.tokenizer_name:
        metrics["token_lengths"] = result.ledger.token_length_stats()
        metrics["max_sequence_length"] = cfg.dataset.max_sequence_length
    write_manifest(
        out,
        stage="validate-data",
        config=cfg,
        inputs={"sources": [fingerprint(source.uri) for source in result.sources]},
        counts=result.ledger.counts(),
        metrics=metrics,
        outputs={"rows": ROWS_DIR, "rejects": REJECTS},
        started_at=started,
    )
    return out

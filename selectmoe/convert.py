"""``selectmoe convert --olmoe PATH_OR_ID --out DIR [--verify]``: a standalone Select-MoE checkpoint.

Not needed for training or scoring (an OLMoE checkpoint loads straight into Select-MoE); useful to
ship one folder with the gates inside. ``--verify`` proves that with every gate forced open the
converted model's logits equal OLMoE's (fp32, max abs diff <= 1e-5).
"""

from __future__ import annotations

import time
from pathlib import Path

from selectmoe.config import ConvertConfig
from selectmoe.console import say
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.models.loading import convert_olmoe, max_logit_diff_gates_open, require_model

VERIFY_TOLERANCE = 1e-5


def convert(cfg: ConvertConfig) -> Path:
    started = time.time()
    require_model("olmoe", cfg.olmoe)
    out = convert_olmoe(
        cfg.olmoe,
        cfg.output_dir,
        seed=cfg.seed,
        quality_gate_init_mean=cfg.quality_gate_init_mean,
        quality_gate_init_std=cfg.quality_gate_init_std,
    )
    metrics = {}
    if cfg.verify:
        diff = max_logit_diff_gates_open(cfg.olmoe, str(out), seed=cfg.seed)
        metrics["max_abs_logit_diff_gates_open"] = diff
        say(f"verify: max |logits(OLMoE) - logits(Select-MoE, gates open)| = {diff:.3e} (fp32)")
        if diff > VERIFY_TOLERANCE:
            raise SystemExit(f"verify failed: {diff:.3e} > {VERIFY_TOLERANCE:.0e}")
    write_manifest(
        out,
        stage="convert",
        config=cfg,
        inputs={"olmoe": fingerprint(cfg.olmoe)},
        metrics=metrics,
        started_at=started,
    )
    return out

"""``selectmoe pipeline`` / ``python -m ray_jobs.pipeline``: stages 1 -> 4 in one run folder.

    RUN/stage_1_pretrain  RUN/stage_2_select  RUN/stage_3_finetune  RUN/stage_4_evaluate
    RUN/baseline_random/{stage_2_select,stage_3_finetune,stage_4_evaluate}   (pipeline.baselines)
    RUN/baseline_full/{stage_3_finetune,stage_4_evaluate}
    RUN/report.md (+ PNGs)                   (names: selectmoe.layout)

Each stage's output feeds the next (no path copying). A stage whose folder holds a finished manifest
under the same key (its resolved config + the keys of the stages it reads) is skipped, so a rerun
redoes nothing and changing a stage-2 key redoes stages 2-4 only.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from selectmoe import console
from selectmoe.config import (
    EvaluateConfig,
    FinetuneConfig,
    PipelineConfig,
    PretrainConfig,
    SelectConfig,
    check_preset_inputs,
    to_dict,
)
from selectmoe.evaluate import evaluate
from selectmoe.finetune import finetune
from selectmoe.layout import BASELINE_PREFIX, PIPELINE_KEY, SCORES_DIR, SELECTED_JSONL, STAGE_DIRS
from selectmoe.manifest import hash_dict, read_manifest
from selectmoe.pretrain import pretrain
from selectmoe.reporting.report import write_report
from selectmoe.select import select

logger = logging.getLogger(__name__)

BASELINES = ("random", "full")


def stage_configs(cfg: PipelineConfig, run: Path):
    """The four resolved stage configs of the main branch, rooted at ``run``."""
    pre: PretrainConfig = copy.deepcopy(cfg.pretrain)
    sel: SelectConfig = copy.deepcopy(cfg.select)
    fin: FinetuneConfig = copy.deepcopy(cfg.finetune)
    ev: EvaluateConfig = copy.deepcopy(cfg.evaluate)
    for stage in (pre, sel, fin, ev):
        stage.seed = cfg.seed
    for stage in (pre, sel):
        if not (stage.dataset.data_path or stage.dataset.data_dir):
            stage.dataset.data_path = cfg.dataset.data_path
            stage.dataset.data_dir = cfg.dataset.data_dir
            stage.dataset.dataset_names = cfg.dataset.dataset_names
    pre.output_dir = str(run / STAGE_DIRS["pretrain"])
    sel.output_dir = str(run / STAGE_DIRS["select"])
    sel.model_checkpoint_path = pre.output_dir
    _feed(sel, fin, ev, run)
    return pre, sel, fin, ev


def baseline_configs(baseline: str, sel: SelectConfig, fin: FinetuneConfig, ev: EvaluateConfig, root: Path):
    """(select or None, finetune, evaluate) of a baseline branch: ``random`` draws a seeded random
    selection of the same size; ``full`` finetunes on every accepted row of the corpus."""
    b_sel, b_fin, b_ev = copy.deepcopy(sel), copy.deepcopy(fin), copy.deepcopy(ev)
    b_sel.output_dir = str(root / STAGE_DIRS["select"])
    b_sel.selection.method = "random"
    b_sel.selection.targets = b_sel.selection.target_eval_dir = None  # read only by method=similarity
    b_sel.selection.trusted = None  # read by calibrated and score-ranked methods; random ranks by none
    b_sel.selection.balance, b_sel.selection.quotas = "none", None  # a plain random draw
    b_sel.selection.strata = "auto"  # reply strata are filtered_random's
    _feed(b_sel, b_fin, b_ev, root)
    if baseline == "full":
        b_fin.dataset = copy.deepcopy(sel.dataset)
        return None, b_fin, b_ev
    return b_sel, b_fin, b_ev


def _feed(sel: SelectConfig, fin: FinetuneConfig, ev: EvaluateConfig, root: Path) -> None:
    """Wire stage 2 -> 3 -> 4 inside one branch folder."""
    fin.output_dir = str(root / STAGE_DIRS["finetune"])
    fin.dataset.data_path = [str(Path(sel.output_dir) / SELECTED_JSONL)]
    ev.output_dir = str(root / STAGE_DIRS["evaluate"])
    ev.model.name = fin.model.name
    ev.model.tokenizer_name = ev.model.tokenizer_name or fin.model.tokenizer_name
    ev.eval.adapter = fin.output_dir


def run_pipeline(cfg: PipelineConfig, extra_sections: Callable[[Path], list[str]] | None = None) -> Path:
    unknown = sorted(set(cfg.pipeline.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"pipeline.baselines: unknown {unknown}; expected a subset of {list(BASELINES)}")
    check_preset_inputs(cfg)
    run = Path(cfg.output_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pre, sel, fin, ev = stage_configs(cfg, run)
    wanted = set(cfg.pipeline.stages)
    keys: dict[str, str] = {}
    keys["pretrain"] = run_stage("pretrain", pre, pretrain, [], wanted)
    keys["select"] = run_stage("select", sel, select, [keys["pretrain"]], wanted)
    keys["finetune"] = run_stage("finetune", fin, finetune, [keys["select"]], wanted)
    keys["evaluate"] = run_stage("evaluate", ev, evaluate, [keys["finetune"]], wanted)

    branches = {"selected": run}
    for baseline in cfg.pipeline.baselines:
        root = run / f"{BASELINE_PREFIX}{baseline}"
        b_sel, b_fin, b_ev = baseline_configs(baseline, sel, fin, ev, root)
        with console.branch(f"baseline {baseline}"):
            if b_sel is not None:
                share_scores(Path(sel.output_dir), Path(b_sel.output_dir))
                upstream = run_stage("select", b_sel, select, [keys["pretrain"]], wanted)
            else:
                upstream = hash_dict(to_dict(b_fin.dataset))
            b_key = run_stage("finetune", b_fin, finetune, [upstream], wanted)
            run_stage("evaluate", b_ev, evaluate, [b_key], wanted)
        branches[baseline] = root

    report = write_report(
        run,
        branches,
        seconds=time.time() - started,
        extra_sections=extra_sections(run) if extra_sections else None,
    )
    logger.info("pipeline finished in %.0f s: %s", time.time() - started, report)
    return report


def run_stage(name: str, cfg, fn: Callable, upstream: list[str], wanted: set[str]) -> str:
    """Run ``fn(cfg)`` unless its folder already holds a finished run under the same key; return the key."""
    out = Path(cfg.output_dir)
    key = hash_dict({"config": to_dict(cfg), "upstream": upstream})
    manifest = read_manifest(out)
    key_file = out / PIPELINE_KEY
    finished = manifest and manifest.get("status") == "finished" and key_file.exists()
    title = console.STAGE_TITLES[name]
    if finished and json.loads(key_file.read_text()).get("key") == key:
        console.say(f"{title}: finished earlier under the same config, kept ({out.name})")
        return key
    if name not in wanted:
        raise RuntimeError(f"stage {name} is needed at {out} but pipeline.stages excludes it")
    logger.info("%s: running into %s", name, out)
    fn(cfg)
    key_file.write_text(json.dumps({"key": key, "upstream": upstream}))
    console.say(console.summary(name, read_manifest(out) or {}))
    return key


def share_scores(source: Path, target: Path) -> None:
    """A baseline selection over the same corpus reuses the main run's score files (no rescoring)."""
    scores = source / SCORES_DIR
    if scores.is_dir() and not (target / SCORES_DIR).exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(scores, target / SCORES_DIR)

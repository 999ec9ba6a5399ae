"""``selectmoe sweep`` / ``python -m ray_jobs.sweep``: Ray Tune over the stage-1 recipe, best trials on to lm-eval.

Each trial is a driver function that runs the stage-1 ``TorchTrainer`` with its sampled overrides
(Train V2 + Tune: ``TuneReportCallback`` forwards every ``ray.train.report``); ASHA stops weak trials
early on a proxy metric: the AUROC of the gate scores on a labelled probe set when
``sweep.probe_labels`` is given (clean rows positive), else the training LM loss. The best
``sweep.handoff_top_k`` trials then go through stages 2 -> 3 -> 4 in their own run folders (the
pipeline, stage 1 reused) and ``sweep_report.md`` ranks them by their eval score.

    selectmoe sweep --config my_pipeline.yaml sweep.space=tune_spaces/quality_loss.yaml sweep.num_samples=16
    selectmoe sweep ... sweep.probe_labels=data/labels.jsonl          # AUROC proxy on labelled rows

Rerunning with the same ``output_dir`` restores an interrupted sweep (``Tuner.restore``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import yaml
from ray.tune.schedulers import ASHAScheduler

from selectmoe.config import (
    ConfigError,
    PipelineConfig,
    SweepConfig,
    build,
    check_preset_inputs,
    deep_merge,
    parse_overrides,
    shipped_yaml,
    to_dict,
)
from selectmoe.evaluate.results import find_results, metric_rows
from selectmoe.layout import (
    ASHA_RUNGS,
    STAGE_DIRS,
    SWEEP_REPORT,
    TRIAL_OVERRIDES,
    TRIALS_DIR,
    TRIALS_FILE,
    TUNE_DIR,
)
from selectmoe.manifest import hash_dict
from selectmoe.pipeline import run_pipeline, run_stage, stage_configs
from selectmoe.reporting.compare import compare_runs
from selectmoe.scaling import ensure_ray, free_resources, use_gpu

logger = logging.getLogger(__name__)

SAMPLERS = ("choice", "grid", "loguniform", "uniform")


def load_space(path: str) -> dict:
    """A search-space YAML -> Tune's ``param_space`` (pretrain keys -> samplers)."""
    from ray import tune

    resolved = Path(path)
    if not resolved.exists() and shipped_yaml(path).exists():  # a shipped space, from any working dir
        resolved = shipped_yaml(path)
    raw = yaml.safe_load(resolved.read_text()) or {}
    space = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(
                f"{path}: {key}: expected one of {SAMPLERS}, e.g. {{choice: [a, b]}}; got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "grid":
            space[key] = tune.grid_search(values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(values[0]), float(values[1]))
        else:
            space[key] = tune.uniform(float(values[0]), float(values[1]))
    return space


def trial_config(base: dict, overrides: dict) -> PipelineConfig:
    """The pipeline config of one trial: the base with ``pretrain.<key>=value`` for each sampled key."""
    dotted = [f"pretrain.{key}={json.dumps(value)}" for key, value in sorted(overrides.items())]
    return build(PipelineConfig, deep_merge(base, parse_overrides(dotted)))


def trial_folder(sweep_dir: Path, overrides: dict) -> Path:
    """Named by a hash of the sampled values: stable across restores (never a timestamp)."""
    return sweep_dir / TRIALS_DIR / f"trial_{hash_dict(overrides)[:10]}"


def _run_trial(overrides: dict, *, base: dict, sweep_dir: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from selectmoe.pretrain import pretrain

    cfg = trial_config(base, overrides)
    run = trial_folder(Path(sweep_dir), overrides)
    run.mkdir(parents=True, exist_ok=True)
    (run / TRIAL_OVERRIDES).write_text(json.dumps(overrides, sort_keys=True, indent=2))
    pre, *_ = stage_configs(cfg, run)
    fit = functools.partial(pretrain, callbacks=[TuneReportCallback()])
    run_stage("pretrain", pre, fit, [], {"pretrain"})


def run_sweep(cfg: SweepConfig) -> Path:
    from ray import tune

    check_preset_inputs(cfg)
    ensure_ray()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in to_dict(cfg).items() if k != "sweep"}
    if cfg.sweep.probe_labels:
        base["pretrain"]["training"]["probe_labels"] = cfg.sweep.probe_labels
    metric, mode = _metric(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=base, sweep_dir=str(out)), {"cpu": 0.01}
    )
    storage, name = str(out / TUNE_DIR), "sweep"
    if tune.Tuner.can_restore(f"{storage}/{name}"):
        logger.info("restoring the interrupted sweep in %s/%s", storage, name)
        tuner = tune.Tuner.restore(f"{storage}/{name}", trainable, resume_errored=True)
    else:
        (out / TUNE_DIR / ASHA_RUNGS).unlink(missing_ok=True)  # an earlier sweep's, never restored
        space = load_space(cfg.sweep.space)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                # a fresh actor per trial: the placement groups of a stopped trial's Ray Train run are
                # released with its actor (reused actors kept them, and the next trial starved)
                reuse_actors=False,
                metric=metric,
                mode=mode,
                num_samples=cfg.sweep.num_samples,
                max_concurrent_trials=cfg.sweep.max_concurrent_trials or _concurrent_trials(cfg),
                scheduler=RestorableASHA(
                    out / TUNE_DIR / ASHA_RUNGS,
                    time_attr="step",
                    grace_period=cfg.sweep.grace_period,
                    reduction_factor=cfg.sweep.reduction_factor,
                    max_t=_longest_trial(cfg, space),
                ),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    grid = tuner.fit()
    trials = [
        {
            "overrides": r.config,
            "metric": r.metrics.get(metric),
            "steps": r.metrics.get("step", 0),
            "total_steps": r.metrics.get("total_steps", 0),
        }
        for r in grid
        if r.metrics
    ]
    ranked = rank_trials(trials, mode)
    (out / TRIALS_FILE).write_text(
        json.dumps(
            [{"folder": trial_folder(out, t["overrides"]).name, **t} for t in ranked],
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    handoff = ranked[: cfg.sweep.handoff_top_k]
    runs = []
    for trial in handoff:
        run = trial_folder(out, trial["overrides"])
        trial_cfg = trial_config(base, trial["overrides"])
        trial_cfg.output_dir = str(run)
        run_pipeline(trial_cfg)
        runs.append((trial, run))
    return _write_sweep_report(out, trials, runs, metric, mode)


class RestorableASHA(ASHAScheduler):
    """ASHA that keeps its rung records in a JSON file beside Tune's state. Tune saves no scheduler
    state: ``Tuner.restore`` unpickles the scheduler as it was built, with empty rungs, so the trials
    left after a restore would only be compared with each other. This one reads the file back before
    its first decision and rewrites it after each result."""

    def __init__(self, rungs_file: Path, **kwargs):
        super().__init__(**kwargs)
        self._rungs_file = Path(rungs_file)
        self._rungs_read = False

    def _read_rungs(self) -> None:
        if self._rungs_read:
            return
        self._rungs_read = True
        if not self._rungs_file.exists():
            return
        saved = json.loads(self._rungs_file.read_text())
        for bracket, rungs in zip(self._brackets, saved, strict=True):
            for (_, recorded), (_, saved_recorded) in zip(bracket._rungs, rungs, strict=True):
                recorded.update(saved_recorded)

    def _write_rungs(self) -> None:
        rungs = [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets]
        partial = self._rungs_file.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(rungs))
        partial.replace(self._rungs_file)

    def on_trial_add(self, tune_controller, trial):
        self._read_rungs()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._read_rungs()
        action = super().on_trial_result(tune_controller, trial, result)
        self._write_rungs()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._read_rungs()
        super().on_trial_complete(tune_controller, trial, result)
        self._write_rungs()


def _longest_trial(cfg: SweepConfig, space: dict) -> int:
    """ASHA's ``max_t``: one more than the most steps a trial can run. ASHA stops a trial that reports
    ``max_t``, and a trial stopped at its last step never wrote its stage-1 outputs (router weights,
    manifest). ``training.max_steps`` may be searched; without a step limit (epochs decide) the bound is
    open, so ASHA never stops a trial for its length."""
    steps = [cfg.pretrain.training.max_steps]
    domain = space.get("training.max_steps")
    if isinstance(domain, dict):  # grid_search
        steps += domain["grid_search"]
    elif hasattr(domain, "categories"):  # choice
        steps += domain.categories
    elif domain is not None:  # uniform / loguniform
        steps.append(domain.upper)
    if min(steps) <= 0:
        return 10**9
    return max(cfg.sweep.grace_period + 1, *(int(s) for s in steps)) + 1


def rank_trials(trials: list[dict], mode: str) -> list[dict]:
    """Trials with a metric, best first: those that ran their whole stage 1 (``steps`` reached their
    own ``total_steps``; ``training.max_steps`` may be searched) before those ASHA stopped, then by
    the metric in its ``mode`` (max or min); a NaN metric ranks last."""
    finished = [t for t in trials if t["metric"] is not None]
    return sorted(
        finished, key=lambda t: (t["steps"] < t["total_steps"], *_best_first(t["metric"], mode == "max"))
    )


def _best_first(value: float, higher_is_better: bool) -> tuple[bool, float]:
    """A sort key that puts the best value first and NaN last."""
    if math.isnan(value):
        return True, 0.0
    return False, -value if higher_is_better else value


def _metric(cfg: SweepConfig) -> tuple[str, str]:
    if cfg.sweep.metric != "auto":
        return cfg.sweep.metric, cfg.sweep.mode
    return ("probe_auroc", "max") if cfg.sweep.probe_labels else ("lm_loss", "min")


def _concurrent_trials(cfg: SweepConfig) -> int:
    """Trials that fit at once: on GPUs, GPUs / workers per trial; on CPUs, one trial per 2 free CPUs
    (its Train worker and the Ray Data tasks that read its rows)."""
    free = free_resources()
    if use_gpu(cfg.pretrain.scaling):
        return max(1, int(free.get("GPU", 1)) // max(1, cfg.pretrain.scaling.num_workers or 1))
    return max(1, int(free.get("CPU", 1) // 2))


def headline_metric(results: dict):
    """The metric a run is ranked by: the first metric of the first group (e.g. mmlu's average over
    subjects), else of the first task."""
    rows = metric_rows(results)
    groups = list(results.get("groups") or {})
    grouped = [row for row in rows if groups and row.task == groups[0]]
    return (grouped or rows or [None])[0]


def higher_is_better(results: dict, row) -> bool:
    """lm-eval's own direction for a metric (``results["higher_is_better"]``); higher when unknown."""
    if row is None:
        return True
    name = row.metric.split(" (", 1)[0]  # "exact_match (get-answer)" -> "exact_match"
    return bool(results.get("higher_is_better", {}).get(row.task, {}).get(name, True))


def _write_sweep_report(out: Path, trials: list[dict], runs: list, metric: str, mode: str) -> Path:
    lines = [f"# Sweep: {out.name}", "", f"Proxy metric `{metric}` ({mode}); {len(trials)} trials.", ""]
    lines += ["| trial | overrides | steps | " + metric + " |", "|---|---|---:|---:|"]
    for t in trials:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(t["overrides"].items()))
        value = "–" if t["metric"] is None else f"{t['metric']:.4f}"
        lines.append(f"| {trial_folder(out, t['overrides']).name} | {shown} | {t['steps']} | {value} |")
    ranked = []
    for trial, run in runs:
        results = json.loads(find_results(run / STAGE_DIRS["evaluate"]).read_text())
        row = headline_metric(results)
        value = row.value if row else float("nan")
        ranked.append((_best_first(value, higher_is_better(results, row)), value, trial, run, row))
    ranked.sort(key=lambda x: x[0])
    ranked = [item[1:] for item in ranked]
    if ranked:
        head = ranked[0][3]
        lines += ["", f"## Handed off to stages 2-4, ranked by {head.task} {head.metric}", ""]
        lines += [f"{i + 1}. `{run.name}`: {value:.4f}" for i, (value, _, run, _) in enumerate(ranked)]
        evals = [str(run / STAGE_DIRS["evaluate"]) for _, _, run, _ in ranked]
        lines += ["", compare_runs(evals, labels=[run.name for _, _, run, _ in ranked])]
    path = out / SWEEP_REPORT
    path.write_text("\n".join(lines) + "\n")
    return path

"""Stage 4: score the target model (+ its LoRA adapter) with lm-eval, inside Ray tasks.

Local CPU (small slices of each task):
    selectmoe evaluate model.name=/models/tiny eval.adapter=outputs/stage_3_finetune eval.limit=8
One GPU node or a cluster (one Ray task per lm-eval task, one GPU each):
    ray job submit --working-dir . -- python -m ray_jobs.evaluate \\
        model.name=meta-llama/Llama-2-7b-hf eval.adapter=outputs/stage_3_finetune eval.tasks=[less]
Air-gapped (the ``*_local`` tasks of ``selectmoe/eval_tasks`` over a local copy of the eval sets):
    selectmoe evaluate ... eval.data_dir=/data/eval eval.tasks=[less]

``eval.tasks`` takes lm-eval task/group names and two presets: ``less`` (MMLU 5-shot, BBH 3-shot
CoT, TyDi QA GoldP 1-shot: the LESS protocol) and ``seed`` (the seed project's MMLU, HellaSwag,
ARC-Easy, ARC-Challenge at lm-eval's default shots). With ``eval.data_dir`` the presets use the
local tasks; a preset member without a local version (HellaSwag, ARC-Easy) is an error that names
it, rather than a silent gap in the results. lm-eval's default seeds are kept, so the numbers
compare with other lm-eval runs.

Outputs in ``output_dir``: ``results.json`` (lm-eval's results dict, all tasks merged),
``results.md`` (task, metric, value, stderr) and ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from selectmoe.config import ConfigError, EvaluateConfig
from selectmoe.console import phase
from selectmoe.evaluate.results import metric_rows, results_table
from selectmoe.evaluate.tasks import available_local_tasks, local_family, write_local_tasks
from selectmoe.layout import RESULTS, RESULTS_TABLE
from selectmoe.manifest import fingerprint, write_manifest
from selectmoe.models.loading import require_model
from selectmoe.scaling import cpu_threads, ensure_ray
from selectmoe.training.common import set_cpu_threads

logger = logging.getLogger(__name__)

# preset -> (lm-eval task or group, shots; None = the task's default)
PRESETS: dict[str, list[tuple[str, int | None]]] = {
    "less": [("mmlu", 5), ("bbh_cot_fewshot", 3), ("tydiqa_goldp", 1)],
    "seed": [("mmlu", None), ("hellaswag", None), ("arc_easy", None), ("arc_challenge", None)],
}
# hub task -> its offline version in selectmoe/eval_tasks
LOCAL_VERSIONS = {
    "mmlu": "mmlu_local",
    "bbh_cot_fewshot": "bbh_local",
    "tydiqa_goldp": "tydiqa_local",
    "arc_challenge": "arc_challenge_local",
    "gsm8k": "gsm8k_local",
}
CPU_BATCH_SIZE = 4  # eval.batch_size=auto on CPU: lm-eval's "auto" searches GPU memory
# driver settings the eval workers must share (a cluster's workers do not inherit the driver's env)
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")
# lm-eval result keys that are per-task mappings, merged across jobs
_PER_TASK_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)


@dataclass(frozen=True)
class EvalJob:
    """One lm-eval task or group, run by one ``simple_evaluate`` call."""

    task: str
    num_fewshot: int | None = None


def expand_tasks(
    tasks: list[str], data_dir: str | None = None, num_fewshot: int | None = None
) -> list[EvalJob]:
    """Presets -> their tasks; with ``data_dir`` every task that has a local version becomes it (the
    hub's ``arc_challenge`` -> ``arc_challenge_local``); other names pass through. ``num_fewshot``
    replaces every preset's shots."""
    jobs: list[EvalJob] = []
    for name in tasks:
        if name not in PRESETS:
            jobs.append(EvalJob(LOCAL_VERSIONS.get(name, name) if data_dir else name, num_fewshot))
            continue
        members = PRESETS[name]
        if data_dir:
            missing = [task for task, _ in members if task not in LOCAL_VERSIONS]
            if missing:
                local = [LOCAL_VERSIONS[task] for task, _ in members if task in LOCAL_VERSIONS]
                raise ConfigError(
                    f"eval.tasks: preset '{name}' includes {missing}, which have no local version for "
                    f"eval.data_dir; list the tasks instead (eval.tasks=[{','.join(local)}]) or unset "
                    "eval.data_dir to load them from the hub"
                )
            members = [(LOCAL_VERSIONS[task], shots) for task, shots in members]
        jobs += [EvalJob(task, num_fewshot if num_fewshot is not None else shots) for task, shots in members]
    return list(dict.fromkeys(jobs))


def evaluate(cfg: EvaluateConfig) -> Path:
    """Run lm-eval on ``cfg.model`` (+ ``cfg.eval.adapter``); write results and the manifest."""
    started = time.time()
    jobs = expand_tasks(cfg.eval.tasks, cfg.eval.data_dir, cfg.eval.num_fewshot)
    _check_local_data(jobs, cfg.eval.data_dir)
    _parse_batch_size(cfg.eval.batch_size)  # fail before any Ray work
    require_model("model.name", cfg.model.name)
    if cfg.eval.adapter:
        require_model("eval.adapter", cfg.eval.adapter)
    ensure_ray()
    with phase(f"stage 4 evaluate: lm-eval on {', '.join(job.task for job in jobs)}"):
        results = merge_results(ray.get(_submit(cfg, jobs)))

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / RESULTS_TABLE).write_text(results_table(results), encoding="utf-8")
    write_manifest(
        out,
        stage="evaluate",
        config=cfg,
        inputs=_inputs(cfg),
        counts={
            "tasks": len(results["results"]),
            "samples": sum(n["effective"] for n in results["n-samples"].values()),
        },
        metrics=_headline_metrics(results),
        outputs={"results": RESULTS, "table": RESULTS_TABLE},
        started_at=started,
    )
    return out


def merge_results(parts: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One lm-eval results dict from the per-job dicts of every Ray task. Run-level entries
    (config, versions of the environment, date) come from the first job."""
    flat = [result for part in parts for result in part]
    merged = dict(flat[0])
    for key in _PER_TASK_KEYS:
        merged[key] = {name: value for result in flat for name, value in result.get(key, {}).items()}
    return merged


# ---------------------------------------------------------------------------- Ray


def _submit(cfg: EvaluateConfig, jobs: list[EvalJob]) -> list[ray.ObjectRef]:
    # the cluster's GPUs, not its free ones: busy GPUs mean waiting, never a 7B model on CPU
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else gpus > 0
    if use_gpu and not gpus:
        raise ConfigError("scaling.use_gpu is true but the Ray cluster has no GPU")
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if use_gpu:
        # one task per lm-eval task: Ray runs as many at once as there are GPUs, queues the rest
        remote = _run_jobs_remote.options(num_gpus=1, runtime_env=runtime_env)
        return [remote.remote(cfg, [job], "cuda") for job in jobs]
    # CPU: one task loads the model once and runs the jobs in turn, on the free CPUs' threads
    remote = _run_jobs_remote.options(num_cpus=1, runtime_env=runtime_env)
    return [remote.remote(cfg, jobs, "cpu", cpu_threads(1))]


@ray.remote
def _run_jobs_remote(
    cfg: EvaluateConfig, jobs: list[EvalJob], device: str, threads: int | None = None
) -> list[dict[str, Any]]:
    set_cpu_threads(threads)
    return run_jobs(cfg, jobs, device)


def run_jobs(cfg: EvaluateConfig, jobs: list[EvalJob], device: str) -> list[dict[str, Any]]:
    """Load the model once and run each job through ``lm_eval.simple_evaluate`` in this process;
    returns JSON-safe results dicts (lm-eval's carry task hooks that only this process can import)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    model_args = lm_eval_model_args(cfg, device)
    batch_size = _parse_batch_size(cfg.eval.batch_size)
    if isinstance(batch_size, str) and device != "cuda":
        batch_size = CPU_BATCH_SIZE
    loading = time.perf_counter()
    lm = HFLM(**model_args, device=device, batch_size=batch_size)
    load_seconds = time.perf_counter() - loading
    limit = cfg.eval.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    gen_kwargs = {"max_gen_toks": cfg.eval.max_gen_toks} if cfg.eval.max_gen_toks else None
    results = []
    with tempfile.TemporaryDirectory(prefix="selectmoe_tasks_") as include_dir:
        task_manager = _task_manager(jobs, cfg.eval.data_dir, include_dir)
        for job in jobs:
            logger.info("lm-eval %s (num_fewshot=%s)", job.task, job.num_fewshot)
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=[job.task],
                num_fewshot=job.num_fewshot,
                limit=limit,
                task_manager=task_manager,
                apply_chat_template=cfg.eval.apply_chat_template,
                gen_kwargs=gen_kwargs,
                log_samples=False,
            )
            # lm-eval records only the LM's class name when handed a built model
            result["config"].update(
                model="hf",
                model_args=model_args,
                batch_size=batch_size,
                device=device,
                model_load_s=load_seconds,
            )
            results.append(json.loads(json.dumps(result, default=handle_non_serializable)))
    return results


# ---------------------------------------------------------------------------- helpers


def _task_manager(jobs: list[EvalJob], data_dir: str | None, include_dir: str):
    """lm-eval's task index: the local tasks written for ``data_dir`` (paths filled in), plus
    lm-eval's own tasks when a job names one."""
    from lm_eval.tasks import TaskManager

    families = list(dict.fromkeys(f for job in jobs if (f := local_family(job.task))))
    if families:
        write_local_tasks(data_dir, include_dir, families)
    needs_hub_tasks = any(local_family(job.task) is None for job in jobs)
    return TaskManager(include_path=include_dir if families else None, include_defaults=needs_hub_tasks)


def _check_local_data(jobs: list[EvalJob], data_dir: str | None) -> None:
    """Fail before any Ray work when a local task has no data_dir or no data in it."""
    families = {f for job in jobs if (f := local_family(job.task))}
    if not families:
        return
    if not data_dir:
        raise ConfigError(f"eval.tasks: {sorted(families)} read a local folder; set eval.data_dir")
    missing = families - set(available_local_tasks(data_dir))
    if missing:
        raise ConfigError(
            f"eval.data_dir: no data for {sorted(missing)} in {data_dir} "
            "(expected layouts: selectmoe/eval_tasks/__init__.py)"
        )


def lm_eval_model_args(cfg: EvaluateConfig, device: str) -> dict[str, Any]:
    """HFLM arguments: the base model, its adapter, and the adapter's tokenizer when it saved one
    (stage 3 adds a pad token, which the embeddings are resized for)."""
    args: dict[str, Any] = {
        "pretrained": cfg.model.name,
        "dtype": _dtype(cfg.model.dtype, device),
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.eval.adapter:
        args["peft"] = cfg.eval.adapter
    tokenizer = cfg.model.tokenizer_name
    if tokenizer is None and cfg.eval.adapter and (Path(cfg.eval.adapter) / "tokenizer_config.json").exists():
        tokenizer = cfg.eval.adapter
    if tokenizer:
        args["tokenizer"] = tokenizer
    return args


def _dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def _parse_batch_size(batch_size: str) -> int | str:
    """``"8"`` -> 8; ``"auto"`` / ``"auto:N"`` (lm-eval's search, N re-searches) stay text."""
    if batch_size == "auto" or batch_size.startswith("auto:"):
        return batch_size
    try:
        return int(batch_size)
    except ValueError as err:
        raise ConfigError(f"eval.batch_size: expected 'auto' or an integer, got {batch_size!r}") from err


def _headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` -> value for the tasks and groups that are not inside a group."""
    subtasks = {task for members in results.get("group_subtasks", {}).values() for task in members}
    return {f"{row.task}/{row.metric}": row.value for row in metric_rows(results) if row.task not in subtasks}


def _inputs(cfg: EvaluateConfig) -> dict[str, Any]:
    inputs = {"model": fingerprint(cfg.model.name)}
    if cfg.eval.adapter:
        inputs["adapter"] = fingerprint(cfg.eval.adapter)
    if cfg.eval.data_dir:
        inputs["data_dir"] = fingerprint(cfg.eval.data_dir)
    return inputs

"""Ray Tune sweep on tiny models on 2 CPUs: trials run stage 1 on Ray Train, ASHA prunes on the probe
AUROC, the best trial goes through stages 2-4; a sweep whose driver is killed resumes on a rerun of
the same command, and a rerun of a finished sweep restores it without training anything again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from selectmoe.config import parse_config
from selectmoe.demo.corpus import write_demo_corpus
from selectmoe.evaluate.results import metric_rows
from selectmoe.layout import ASHA_RUNGS, TUNE_DIR
from selectmoe.manifest import read_manifest
from selectmoe.sweep import _longest_trial, higher_is_better, load_space, rank_trials, trial_folder

pytestmark = [pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]


def test_shipped_spaces_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the spaces are package data
    space = load_space(parse_config("sweep").sweep.space)
    assert set(space) >= {
        "training.quality_loss_type",
        "training.quality_loss_weight",
        "training.learning_rate",
    }
    assert (
        len(load_space("tune_spaces/loss_type_grid.yaml")["training.quality_loss_type"]["grid_search"]) == 4
    )


def test_searched_training_length_sets_ashas_bound_and_the_ranking():
    search = load_space("tune_spaces/selection_search.yaml")
    assert _longest_trial(parse_config("sweep", overrides=["pretrain.training.max_steps=30"]), search) == 81
    # no step limit (epochs decide): ASHA must not stop trials for their length
    assert _longest_trial(parse_config("sweep"), load_space("tune_spaces/quality_loss.yaml")) >= 10**6
    trials = [
        {
            "overrides": {"training.max_steps": 80},
            "steps": 20,
            "total_steps": 80,
            "metric": 0.9,
        },  # ASHA-stopped
        {"overrides": {"training.max_steps": 20}, "steps": 20, "total_steps": 20, "metric": 0.6},
        {"overrides": {"training.max_steps": 80}, "steps": 80, "total_steps": 80, "metric": 0.7},
        {"overrides": {}, "steps": 3, "total_steps": 80, "metric": None},  # never reported the metric
    ]
    assert [t["metric"] for t in rank_trials(trials, "max")] == [0.7, 0.6, 0.9]
    assert [t["metric"] for t in rank_trials(trials, "min")] == [0.6, 0.7, 0.9]


def test_ranking_follows_the_metrics_direction_and_puts_nan_last():
    trials = [
        {"overrides": {"i": i}, "steps": 5, "total_steps": 5, "metric": m}
        for i, m in enumerate([2.5, float("nan"), 1.5, 3.0])
    ]
    assert [t["overrides"]["i"] for t in rank_trials(trials, "min")] == [2, 0, 3, 1]  # lm_loss-like
    assert [t["overrides"]["i"] for t in rank_trials(trials, "max")] == [3, 0, 2, 1]
    # the hand-off ranks eval runs by lm-eval's own direction for the headline metric
    results = {
        "results": {"task": {"alias": "task", "perplexity,none": 12.0, "acc,none": 0.5}},
        "higher_is_better": {"task": {"perplexity": False, "acc": True}},
    }
    perplexity, acc = metric_rows(results)
    assert not higher_is_better(results, perplexity) and higher_is_better(results, acc)


def sweep_args(out: Path, data: Path, olmoe: Path, llama: Path, targets: Path, space: Path) -> list[str]:
    return [
        "sweep",
        "preset=similarity",  # the hand-off selects by similarity to the target examples
        f"select.selection.targets=[{targets}]",
        f"output_dir={out}",
        f"dataset.data_path={data / 'train'}",
        f"pretrain.selector_model.path={olmoe}",
        f"finetune.model.name={llama}",
        f"evaluate.eval.data_dir={data / 'eval'}",
        "evaluate.eval.tasks=[mmlu_local]",
        "evaluate.eval.limit=2",
        "pretrain.dataset.subset_ratio=0.5",
        "pretrain.dataset.max_sequence_length=128",
        "pretrain.training.batch_size=4",
        "pretrain.training.max_steps=6",
        "pretrain.training.learning_rate=0.05",
        "pretrain.training.quality_loss_weight=10",
        "pretrain.training.gradient_checkpointing=false",
        "pretrain.training.checkpoint_every_steps=1",
        "pretrain.training.probe_rows=64",
        "pretrain.training.probe_every_steps=1",
        "select.dataset.max_sequence_length=128",
        "finetune.dataset.max_sequence_length=128",
        "finetune.training.batch_size=4",
        "finetune.training.epochs=1",
        "finetune.training.gradient_checkpointing=false",
        "finetune.training.lora.r=4",
        f"sweep.space={space}",
        "sweep.num_samples=1",
        "sweep.grace_period=2",
        "sweep.reduction_factor=2",
        "sweep.handoff_top_k=1",
        f"sweep.probe_labels={data / 'labels.jsonl'}",
    ]


def last_history(stage1: Path) -> list[dict]:
    """The longest metrics history of a trial: its final output, or its last checkpoint if ASHA stopped it."""
    histories = [
        [json.loads(x) for x in path.read_text().splitlines()] for path in stage1.rglob("metrics.jsonl")
    ]
    return max(histories, key=len)


def manifests(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("manifest.json")}


def tune_trials(out: Path) -> dict[str, dict]:
    """Trial id -> {status, config, logdir} from Tune's newest experiment state file: what a restore
    reads. Empty until Tune first writes it (or while it is being rewritten)."""
    files = sorted((out / "tune" / "sweep").glob("experiment_state-*.json"))
    try:
        state = json.loads(files[-1].read_text()) if files else {"trial_data": []}
    except json.JSONDecodeError:
        return {}
    trials = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        trials[trial["trial_id"]] = {
            "status": trial["status"],
            "config": trial["config"],
            "logdir": out / "tune" / "sweep" / trial["relative_logdir"],
        }
    return trials


def trained(out: Path, trial: dict) -> dict[str, object]:
    """What training a trial left: Tune's result rows and its stage-1 Ray Train checkpoints."""
    stage1 = trial_folder(out, trial["config"]) / "stage_1_pretrain"
    return {
        "results": (trial["logdir"] / "result.json").read_text(),
        "checkpoints": sorted(
            (str(p.relative_to(stage1)), p.stat().st_mtime_ns) for p in stage1.rglob("checkpoint_*/*")
        ),
    }


class Driver:
    """``selectmoe sweep`` in a child process, like a user's terminal or a ``ray job submit`` driver.

    It starts its own local Ray (RAY_ADDRESS unset), beside whatever Ray this pytest process or anyone
    else on the machine runs. Every process it starts is remembered while it runs, so what a killed
    driver leaves behind (e.g. Ray's runtime-env agent outlives its raylet) is stopped on close."""

    def __init__(self, args: list[str], logs: Path):
        # the test session's fast Ray Train poll (conftest) is left out: it made this test no faster
        # (321-408 s with it, 357 s without) and once hung the hand-off's Ray Data stage
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
        }
        self.stdout, self.stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "selectmoe.cli", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.seen: dict[int, psutil.Process] = {}

    def track(self) -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            self.seen.update((p.pid, p) for p in [root, *root.children(recursive=True)])

    def wait(self, timeout_s: float, kill_when=None) -> int | None:
        """Exit code; with ``kill_when``, SIGKILL the driver (only the driver) once it holds and return
        None. Fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            self.track()
            if kill_when is not None and kill_when():
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                return None
            assert time.monotonic() < deadline, f"sweep still running after {timeout_s}s:\n{self.tail()}"
            time.sleep(2)
        return self.proc.returncode

    def tail(self) -> str:
        return "".join(log.read_text(errors="replace")[-3000:] for log in (self.stdout, self.stderr))

    def printed(self) -> Path:
        """The last line of stdout: the report path (``selectmoe`` prints it after stopping Ray)."""
        return Path(self.stdout.read_text().strip().splitlines()[-1])

    def close(self, grace_s: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        procs = list(self.seen.values())
        _, alive = psutil.wait_procs(procs, timeout=grace_s)  # Ray's own fate sharing first
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)


def run_driver(args: list[str], logs: Path, timeout_s: float, kill_when=None) -> tuple[int | None, Driver]:
    """Run (or kill, see ``Driver.wait``) one sweep driver, and stop what it left."""
    driver = Driver(args, logs)
    try:
        return driver.wait(timeout_s, kill_when), driver
    finally:
        driver.close()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sweep_killed_mid_run_resumes_and_a_finished_sweep_restores(tiny_olmoe, tiny_llama, tmp_path):
    """No ``ray_session``: each run is a driver process of its own. 1) the sweep is SIGKILLed once Tune's
    saved state holds a finished trial and an unfinished one; 2) the same command resumes it to the
    end: finished trials are not trained again, the others run, the hand-off and the report complete;
    3) once more: a finished sweep restores and trains, selects, finetunes and evaluates nothing."""
    data = write_demo_corpus(tmp_path / "data", seed=0, n_rows=300, eval_questions=4)
    targets = tmp_path / "targets.jsonl"
    first_rows = (sorted((data / "train").glob("*.jsonl"))[0]).read_text().splitlines()[:2]
    targets.write_text("".join(json.dumps({**json.loads(r), "task": "demo_task"}) + "\n" for r in first_rows))
    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"  # three of the shipped grid's loss types: a trial less to wait for
    space.write_text("training.quality_loss_type:\n  grid: [sigmoid, mse, beta_moment_matching]\n")
    args = sweep_args(out, data, tiny_olmoe, tiny_llama, targets, space)

    def finished() -> dict[str, dict]:
        return {k: v for k, v in tune_trials(out).items() if v["status"] == "TERMINATED"}

    # 1) killed after a trial finished and before all did (3 grid points; Tune lists trials lazily)
    rc, driver = run_driver(args, tmp_path / "run1", 420, kill_when=lambda: 1 <= len(finished()) < 3)
    assert rc is None, driver.tail()
    done_before = finished()
    assert 1 <= len(done_before) < 3
    before = {trial_id: trained(out, trial) for trial_id, trial in done_before.items()}
    # a trial that ran its whole stage 1 wrote its outputs there (ASHA did not stop it at its last step)
    full_length = [
        trial_folder(out, t["config"]) / "stage_1_pretrain"
        for t in done_before.values()
        if last_history(trial_folder(out, t["config"]) / "stage_1_pretrain")[-1]["step"] == 6
    ]
    assert full_length, "the first trial has no rival at ASHA's rungs: it runs all 6 steps"
    for stage1 in full_length:
        assert (read_manifest(stage1) or {}).get("status") == "finished", stage1
        assert (stage1 / "router_weights.safetensors").is_file()

    # 2) the same command: Tune restores its experiment and runs what was left
    rc, driver = run_driver(args, tmp_path / "run2", 600)
    assert rc == 0, driver.tail()
    report = driver.printed()
    assert report == out / "sweep_report.md", driver.tail()
    trials = tune_trials(out)
    assert set(trials) >= set(done_before) and len(trials) == 3  # the same experiment, continued
    assert all(t["status"] == "TERMINATED" for t in trials.values())
    for trial_id in done_before:  # finished before the kill: not trained again
        assert trained(out, trials[trial_id]) == before[trial_id], trial_id
    for trial in trials.values():  # every trial has results
        assert (trial["logdir"] / "result.json").read_text().strip()

    folders = sorted((out / "trials").iterdir())
    assert len(folders) == 3  # one per quality-loss type
    steps = {}
    for folder in folders:
        history = last_history(folder / "stage_1_pretrain")
        assert all("probe_auroc" in m for m in history)
        steps[folder.name] = history[-1]["step"]
    # ASHA's rung records outlived the kill (Tune saves no scheduler state; sweep.RestorableASHA does), so
    # the trials run after the restore were judged against the finished trial's results, as in an
    # uninterrupted sweep: with these seeds both fall below the first at step 2 (with empty rungs the
    # first of them ran all 6 steps)
    rungs = {
        milestone: recorded
        for milestone, recorded in json.loads((out / TUNE_DIR / ASHA_RUNGS).read_text())[0]
    }
    assert set(rungs[2]) == set(trials) and len(rungs[4]) == 1
    assert sorted(s == 6 for s in steps.values()) == [False, False, True]  # stopped after rung 2: steps 2-3
    handed_off = [t for t in folders if (t / "stage_4_evaluate" / "results.json").exists()]
    assert len(handed_off) == 1 and steps[handed_off[0].name] == 6
    selected = (handed_off[0] / "stage_2_select" / "selected.jsonl").read_text().splitlines()
    assert selected and {json.loads(r)["target_task"] for r in selected} == {"demo_task"}
    text = report.read_text()
    assert "probe_auroc" in text and "Handed off to stages 2-4" in text and "3 trials" in text
    rows = [line for line in text.splitlines() if line.startswith("| trial_")]
    assert sorted(row.split(" | ")[0][2:] for row in rows) == [f.name for f in folders]
    assert not any(row.endswith("| – |") for row in rows)  # each with its proxy metric

    # 3) rerun a finished sweep: restored from Tune's state, nothing trained or evaluated again
    outputs = manifests(out)
    done = {trial_id: trained(out, trial) for trial_id, trial in trials.items()}
    rc, driver = run_driver(args, tmp_path / "run3", 300)
    assert rc == 0, driver.tail()
    assert manifests(out) == outputs
    assert {trial_id: trained(out, trial) for trial_id, trial in tune_trials(out).items()} == done
    assert "Handed off to stages 2-4" in (out / "sweep_report.md").read_text()

"""Ray Tune sweep on tiny models on 2 CPUs: trials run stage 1 on Ray Train, ASHA prunes on the probe
AUROC, the best trial goes through stages 2-4, and a rerun restores the experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selectmoe.cli import main
from selectmoe.data.synthetic import write_demo_corpus
from selectmoe.sweep import load_space

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]


def test_shipped_spaces_load():
    space = load_space(str(REPO / "tune_spaces" / "quality_loss.yaml"))
    assert set(space) >= {
        "training.quality_loss_type",
        "training.quality_loss_weight",
        "training.learning_rate",
    }
    assert (
        len(load_space("tune_spaces/loss_type_grid.yaml")["training.quality_loss_type"]["grid_search"]) == 4
    )


def sweep_args(out: Path, data: Path, olmoe: Path, llama: Path) -> list[str]:
    return [
        "sweep",
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
        "sweep.space=tune_spaces/loss_type_grid.yaml",
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


def test_sweep_prunes_hands_off_and_restores(ray_session, tiny_olmoe, tiny_llama, tmp_path, capsys):
    data = write_demo_corpus(tmp_path / "data", seed=0, n_rows=300, eval_questions=4)
    out = tmp_path / "sweep"
    args = sweep_args(out, data, tiny_olmoe, tiny_llama)
    assert main(args) == 0
    report = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == out / "sweep_report.md"
    text = report.read_text()
    assert "probe_auroc" in text and "Handed off to stages 2-4" in text
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4  # one per quality-loss type
    steps = {}
    for trial in trials:
        history = last_history(trial / "stage_1_pretrain")
        assert all("probe_auroc" in m for m in history)
        steps[trial.name] = history[-1]["step"]
    assert max(steps.values()) == 6 and min(steps.values()) < 6  # ASHA stopped at least one trial early
    handed_off = [t for t in trials if (t / "stage_4_eval" / "results.json").exists()]
    assert len(handed_off) == 1 and steps[handed_off[0].name] == 6

    # rerun: the experiment is restored from its Tune state and nothing is trained or evaluated again
    before = manifests(out)
    assert main(args) == 0
    assert manifests(out) == before
    assert "Handed off to stages 2-4" in (out / "sweep_report.md").read_text()

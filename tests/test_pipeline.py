"""The demo (the embedded default) end to end on small settings, and pipeline stage-level resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selectmoe.cli import main
from selectmoe.reporting.report import composition_table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = ("stage_1_pretrain", "stage_2_select", "stage_3_finetune", "stage_4_evaluate")


def demo_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "demo",
        f"output_dir={out}",
        f"demo.cache_dir={cache}",
        "demo.rows=400",
        "demo.lm_steps=4",  # the LM pretraining of the tiny models; nothing here depends on its quality
        "demo.target_lm_steps=4",
        "pretrain.training.max_steps=6",
        "finetune.training.epochs=1",
        "evaluate.eval.tasks=[mmlu_local,gsm8k_local]",
        "evaluate.eval.limit=2",
        "evaluate.eval.max_gen_toks=8",
        *extra,
    ]


def finished_at(run: Path) -> dict[str, str]:
    stamps = {}
    for branch in (run, run / "baseline_random"):
        for stage in STAGES:
            manifest = branch / stage / "manifest.json"
            if manifest.exists():
                stamps[f"{branch.name}/{stage}"] = json.loads(manifest.read_text())["finished_at"] + str(
                    manifest.stat().st_mtime_ns
                )
    return stamps


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "run", root / "cache"
    assert main(demo_args(out, cache)) == 0
    return out, cache


def test_demo_writes_a_report_with_plots_baseline_and_separation(demo_run, capsys):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    for heading in ("Stage 1", "Stage 2", "Stage 3", "Stage 4", "Do the scores find the planted defects?"):
        assert heading in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 5
    for image in images:  # every image the report shows exists next to it
        assert (out / image).stat().st_size > 0
    assert "random" in report and "baseline_random" in report  # the baseline is tabled beside the selection
    assert "| task | metric | selected | random | Δ random |" in report  # runs labelled by name, not path
    assert "| dataset | corpus rows | corpus share | selected rows | selected share |" in report
    # the default preset's score, in words (nats: combine=raw; prompt_gain_cap=lower_quartile; nll_model=base;
    # redundancy_weight, redundancy_tolerance)
    formula = (
        "-1 x NLL + 1 x min(prompt gain, its lower quartile) - 8 x max(reply redundancy - 0.4, 0) "
        "(NLLs of the base model)"
    )
    assert f"Score of a row: `{formula}`" in report
    assert (
        "How the rows were chosen: per dataset at its quota (selection.balance), a seeded random draw"
        in report
    )
    gates = next(
        row for row in json.loads((out / "separation.json").read_text())["table"] if "gates" in row["scorer"]
    )
    inverted = "**The gates are inverted on this run**" in report
    assert inverted == (gates["auroc_all"] < 0.5)  # the gate direction is checked, never assumed
    # the shipped score against perplexity, in words, with the paired bootstrap's standard error
    versus = json.loads((out / "separation.json").read_text())["vs_perplexity"]
    relation = {"above": "above", "level": "level with", "below": "below"}
    assert re.search(
        rf"The shipped score is {relation[versus['overall']['verdict']]} perplexity here: AUROC [0-9.]+ vs "
        rf"[0-9.]+ \(difference [-+][0-9.]+, standard error [0-9.]+ .*within datasets it is "
        rf"{relation[versus['within_groups']['verdict']]} it",
        report,
    )
    assert re.search(
        r"Clean rows in what was selected .*: the selection \d+ of \d+, the random baseline", report
    )
    assert "The selector was LM-pretrained 4 steps first (training loss over the last tenth" in report
    separation = json.loads((out / "separation.json").read_text())
    scorers = [row["scorer"] for row in separation["table"]]
    assert "perplexity (-NLL, base model)" in scorers and any("length" in s for s in scorers)
    assert scorers[:2] == ["Select-MoE score (preset=filtered_random)", "gates alone (mean gate)"]
    assert all(0 <= row["auroc_all"] <= 1 for row in separation["table"])
    # judged inside each source dataset too: the worst dataset is at most the mean over them
    assert all(
        0 <= row["auroc_worst_dataset"] <= row["auroc_within_datasets"] <= 1 for row in separation["table"]
    )
    for stage in STAGES:
        assert (out / stage / "manifest.json").exists()
        assert (out / "baseline_random" / stage / "manifest.json").exists() or stage == "stage_1_pretrain"


def test_rerun_redoes_nothing_and_a_stage2_change_redoes_stages_2_to_4(demo_run, capsys):
    out, cache = demo_run
    before = finished_at(out)
    assert main(demo_args(out, cache)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.md")
    assert finished_at(out) == before  # nothing redone

    # preset=similarity changes stage 2 only (its stage 1 is the default's): target-aware selection
    targets = out.parent / "targets.jsonl"
    targets.write_text(
        "".join(
            json.dumps(
                {
                    "task": "arithmetic",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                }
            )
            + "\n"
            for q, a in (
                ("What is 12 plus 30?", "12 plus 30 is 42."),
                ("Tom has 3 apples and buys 4 more.", "7 apples."),
            )
        )
    )
    assert main(demo_args(out, cache, "preset=similarity", f"select.selection.targets=[{targets}]")) == 0
    after = finished_at(out)
    assert after["run/stage_1_pretrain"] == before["run/stage_1_pretrain"]
    for stage in STAGES[1:]:
        assert after[f"run/{stage}"] != before[f"run/{stage}"], stage
        assert after[f"baseline_random/{stage}"] != before[f"baseline_random/{stage}"], stage
    selected = [
        json.loads(line) for line in (out / "stage_2_select" / "selected.jsonl").read_text().splitlines()
    ]
    assert selected and {r["target_task"] for r in selected} == {"arithmetic"}
    manifest = json.loads((out / "stage_2_select" / "manifest.json").read_text())
    assert manifest["config"]["selection"]["method"] == "similarity"


def test_composition_table_flags_a_dataset_over_twice_its_corpus_share():
    table = composition_table({"cot": 35, "dolly": 65}, {"cot": 8, "dolly": 2})
    assert "| cot | 35 | 35.0% | 8 | 80.0% |" in table
    assert "**cot is over-represented**: 80% of the selection against 35% of the corpus" in table
    assert "dolly is over-represented" not in table
    assert "over-represented" not in composition_table({"a": 50, "b": 50}, {"a": 6, "b": 4})


def test_report_prints_the_selections_caution(tmp_path):
    """A selection's manifest caution (filtered_random over one dataset) is a line of the report, and so
    are its reply strata; a selection without them has neither."""
    from selectmoe.layout import STAGE_DIRS
    from selectmoe.reporting.report import write_report

    for caution in ("every candidate row has the same dataset", None):
        run = tmp_path / str(bool(caution))
        strata = {"strata": "reply", "frequent_replies_by_dataset": {"bbh": 7}} if caution else {}
        stage2 = run / STAGE_DIRS["select"]
        stage2.mkdir(parents=True)
        how = {
            "chosen_by": "a seeded random draw",
            "keep_fraction": 0.5,
            **({"caution": caution} if caution else {}),
            **strata,
        }
        manifest = {
            "counts": {
                "rows_read": 10, "rows_scored": 10, "rows_rejected": 0, "rows_selected": 2,
                "datasets": {"web": {"rows_accepted": 10}}, "selected_by_dataset": {"web": 2},
            },
            "config": {"selection": {"method": "filtered_random"}},
            "metrics": {"filtered_random": how},
        }  # fmt: skip
        (stage2 / "manifest.json").write_text(json.dumps(manifest))
        report = write_report(run, {"selected": run}, 1.0).read_text()
        assert "How the rows were chosen: a seeded random draw (selection.keep_fraction 0.5)." in report
        assert ("**Caution:** every candidate row has the same dataset." in report) == bool(caution)
        # selection.strata=reply: how many frequent replies each dataset's draw kept apart
        said = "Frequent replies, each a stratum of its own (`selection.strata=reply`): bbh 7."
        assert (said in report) == bool(caution)


def test_the_random_baseline_drops_the_selections_reply_strata(tmp_path):
    """The pipeline's random baseline copies the selection's config: reply strata set for filtered_random
    must not reach its random draw, which would refuse them after the main branch has run."""
    from selectmoe.config import ConfigError, parse_config
    from selectmoe.pipeline import baseline_configs
    from selectmoe.select.driver import _check_selection

    cfg = parse_config("pipeline", overrides=["select.selection.strata=reply"])
    _check_selection(cfg.select)  # filtered_random, the default preset's
    wrong = parse_config(
        "pipeline", overrides=["select.selection.strata=reply", "select.selection.method=random"]
    )
    with pytest.raises(ConfigError, match="selection.strata=reply"):
        _check_selection(wrong.select)
    b_sel, _, _ = baseline_configs("random", cfg.select, cfg.finetune, cfg.evaluate, tmp_path)
    assert b_sel.selection.method == "random"
    _check_selection(b_sel)

"""The benchmark scripts run end to end at small sizes and print their ratio lines (so they cannot rot).

They measure nothing here: the sizes are too small and CI machines too noisy; only exit status, the ratio
lines and the JSON keys are checked. ``make test`` (CI) leaves them out: together they took ~16 of CI's
~41 minutes. ``make test-benchmarks`` runs them; run it when a change touches a benchmark or what one calls.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.benchmark, pytest.mark.timeout(300)]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, tmp_path: Path, *args: str, timeout: int = 280) -> tuple[str, dict]:
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{name} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout, json.loads(out.read_text())


def test_gpu_scale_smoke(tmp_path):
    stdout, report = run_benchmark("gpu_scale.py", tmp_path, "--smoke")
    assert "ratio scoring tokens/s grouped_mm / eager:" in stdout
    assert "projection: 270,679 rows x 236 tokens on 8 x" in stdout
    phases = [r["phase"] for r in report["results"]]
    assert not [r for r in report["results"] if "error" in r]
    assert "stage3 llama-2-7b lora r=128" in phases
    assert {"stage1 full_rank, experts eager", "stage1 lora, experts grouped_mm"} <= set(phases)
    # FSDP2 units over a one-rank process group (gloo here): the backend runs, the checkpoint gather
    # returns every trainable parameter
    (fsdp,) = [r for r in report["results"] if r["phase"].startswith("stage1 full_rank FSDP2")]
    assert fsdp["all_reduce_ok"] and fsdp["gathered_params"] == fsdp["trainable_params"] > 0


def test_stage1_step_cost_small(tmp_path):
    stdout, report = run_benchmark(
        "stage1_step_cost.py",
        tmp_path,
        *("--rows", "4", "--reps", "2", "--warmup", "1", "--max-length", "128"),
        *("--ray-steps", "2", "--ray-batch", "4", "--ray-max-length", "64"),
        *("--ray-files", "oasst1.jsonl", "--ray-subset-ratio", "0.1"),
    )
    assert "ratio select-moe step / olmoe step:" in stdout
    assert "ratio tokens/s 2 workers / 1 worker:" in stdout
    assert set(report["step_cost"]["median_s"]) == {"select-moe step", "select-moe model", "olmoe"}
    assert {int(w) for w in report["ray_train"]["runs"]} == {1, 2}
    assert all(run["steps"] == 2 for run in report["ray_train"]["runs"].values())


def test_stage2_throughput_small(tmp_path):
    stdout, report = run_benchmark(
        "stage2_throughput.py",
        tmp_path,
        *("--rows", "48", "--reps", "1", "--max-length", "128"),
        *("--n", "20000", "40000", "--k", "200", "--matmul-size", "256"),
    )
    assert "ratio GateScorer / seed loop tokens/s:" in stdout
    assert "ratio select (Ray) / seed loop tokens/s:" in stdout
    assert "memory pandas / stream" in stdout
    assert "MFU" in stdout
    topk = report["topk"]
    assert {(r["n"], r["method"]) for r in topk} >= {(20000, "stream"), (40000, "pandas")}
    for n in (20000, 40000):  # streaming and pandas choose the same rows
        assert len({r["ids"] for r in topk if r["n"] == n and r["k"] == 200}) == 1
    assert report["scoring"]["select_ray"]["real_tokens"] == report["scoring"]["real_tokens"]


def test_selection_quality_small(tmp_path):
    stdout, report = run_benchmark(
        "selection_quality.py",
        tmp_path,
        *("--rows", "300", "--lm-steps", "10", "--stage1-steps", "2", "--max-length", "128"),
        *("--variants", "original", "--work-dir", str(tmp_path / "work")),
    )
    assert "Clean-vs-defect separation on held-out real rows" in stdout
    scorers = [row["scorer"] for row in report["table"]]
    assert scorers == [
        "gates: original",
        "perplexity (-NLL, base model)",
        "response length (tokens)",
        "random",
    ]
    kinds = ("garbled", "shuffled", "swapped", "truncated", "spam", "wrong_answer")
    assert report["columns"] == [
        "scorer",
        "auroc_all",
        *[f"auroc_{k}" for k in sorted(kinds)],
        "precision_at_k",
    ]
    assert all(0 <= row["auroc_all"] <= 1 for row in report["table"])
    seed = report["per_seed"][0]
    assert set(seed["defects"]) == {"", *kinds}  # every kind planted among the held-out rows
    methods = [row["method"] for row in report["coverage"]]
    assert methods == ["held-out rows (the pool)", "top_k", "diversity", "random"]
    assert all(row["datasets_covered"] >= 1 for row in report["coverage"])


@pytest.mark.timeout(660)  # its script may take 600 s (run_benchmark's timeout below)
def test_loko_tiny_chooses_without_the_judged_kind_and_judges_unseen_kinds(tmp_path):
    """One tiny run (strong base, fast stage 1) with D2 from the product's scorer: every planted kind is
    judged by a recipe chosen without it, the unseen kinds are judged, per-dataset columns exist."""
    stdout, report = run_benchmark(
        "loko.py",
        tmp_path,
        *("--tiny", "--d2", "--seeds", "0", "--bases", "strong", "--regimes", "fast"),
        *("--work-dir", str(tmp_path / "work")),
        timeout=600,
    )
    assert "Leave one planted kind out (1 runs)" in stdout
    loko = report["leave_one_kind_out"]
    assert [row["held_out_kind"] for row in loko] == [
        "garbled", "shuffled", "swapped", "truncated", "spam", "wrong_answer"
    ]  # fmt: skip
    assert all(0 <= row["chosen"] <= 1 for row in loko)
    scorers = {row["scorer"] for row in report["by_group"]}
    assert {
        "driving force alone: 1 x z(driving force D2)",
        "perplexity (-NLL, base model)",
        # nats (scoring.combine=raw), the prompt gain capped at its lower quartile (scoring.prompt_gain_cap)
        "default preset (filtered_random): -1 x NLL + 1 x min(prompt gain, its lower quartile) "
        "- 8 x max(reply redundancy - 0.4, 0)",
        "in nats: -1 x NLL + 1 x min(prompt gain, its lower quartile)",  # the same without the redundancy
        "in nats: -1 x NLL + 1 x prompt gain",  # uncapped
        "as robust z-scores: -1 x z(NLL) + 1 x z(prompt gain)",  # the same terms on the robust-z grid
    } <= scorers
    groups = {row["runs"] for row in report["by_group"]}
    assert groups == {"all runs", "small/strong_nllbase/fast"}  # the default preset's NLLs: the base model's
    row = report["by_group"][0]
    assert {"echo", "looped", "empty_ish", "unseen", "within_datasets", "worst_dataset"} <= set(row)
    assert row["worst_dataset"] <= row["within_datasets"]
    # per source dataset, the share of its clean rows the redundancy term pushes down
    over = report["clean_over_redundancy_tolerance"]
    assert set(over) == {"cot", "flan_v2", "oasst1", "human_instructions"} and all(
        0 <= v <= 1 for v in over.values()
    )
    # the default preset's recipe is judged like every other: NLL and capped prompt gain in nats, the reply
    # redundancy beyond its tolerance, no gates
    assert report["default_recipe"] == (
        "-1 x NLL + 1 x min(prompt gain, its lower quartile) - 8 x max(reply redundancy - 0.4, 0)"
    )
    # item 9's rule: the recipe it picks is level with perplexity on the planted kinds, in the run's base
    item_9 = report["item_9"]
    assert isinstance(item_9["default_is_level"], bool)
    if item_9["chosen"] is not None:
        level = next(
            r
            for r in report["by_group"]
            if r["runs"] == "small/strong_nllbase/fast" and item_9["chosen"] in r["scorer"]
        )
        perplexity = next(
            r
            for r in report["by_group"]
            if r["runs"] == "small/strong_nllbase/fast" and r["scorer"] == "perplexity (-NLL, base model)"
        )
        assert round(level["planted"], 3) >= round(perplexity["planted"], 3)


def test_eval_corpus_writes_the_eval_sets_as_rows_that_loko_judges_the_default_on(tmp_path):
    """``eval_corpus.py`` turns ``../shared/data/eval`` into rows the product accepts (right answers, unique
    ids, the same rows on a rerun; ``--set unseen`` holds none of them), and ``loko.py --data-dir`` runs on
    them, each source a dataset."""
    from selectmoe.data import normalize_record

    corpus = tmp_path / "corpus"

    def write(*args: str, out: Path = corpus) -> subprocess.CompletedProcess:
        script = str(BENCHMARKS / "eval_corpus.py")
        return subprocess.run([sys.executable, script, str(out), *args], capture_output=True, text=True)

    assert write("--per-source", "300").returncode == 0
    first = {p.name: p.read_bytes() for p in corpus.glob("*.jsonl")}
    assert write("--per-source", "300").returncode == 0  # rewrites the same rows
    assert {p.name: p.read_bytes() for p in corpus.glob("*.jsonl")} == first

    def read(folder: Path) -> dict[str, list[dict]]:  # each file's rows, checked as the product checks them
        return {
            p.stem: [normalize_record(json.loads(line), default_dataset=p.stem) for line in p.open()]
            for p in folder.glob("*.jsonl")
        }

    rows = read(corpus)
    assert {name: len(r) for name, r in rows.items()} == {
        "gsm8k": 300, "arc": 300, "mmlu": 300, "bbh": 300, "tydiqa_english": 300
    }  # fmt: skip
    assert len({r["id"] for r in sum(rows.values(), [])}) == 1500
    assert all(r["dataset"] == name for name, source in rows.items() for r in source)
    assert all(r["messages"][1]["content"].rsplit("\n", 1)[-1].startswith("#### ") for r in rows["gsm8k"])
    (corpus / "other.jsonl").write_text("")  # the benchmarks read every file of the folder
    done = write()
    assert done.returncode != 0 and "other.jsonl" in done.stderr
    (corpus / "other.jsonl").unlink()

    def written_set(name: str) -> dict[str, list[dict]]:  # another set's rows, each source a dataset
        done = write("--set", name, "--per-source", "300", out=tmp_path / name)
        assert done.returncode == 0, done.stderr
        rows_of_set = read(tmp_path / name)
        assert all(r["dataset"] == source for source, of_source in rows_of_set.items() for r in of_source)
        return rows_of_set

    unseen_rows = written_set("unseen")  # rows the first set does not hold
    assert {name: len(r) for name, r in unseen_rows.items()} == {
        "tydiqa_finnish": 300, "tydiqa_indonesian": 300, "tydiqa_swahili": 300, "mmlu_dev": 285, "bbh_rest": 300
    }  # fmt: skip
    assert len({r["id"] for r in sum(unseen_rows.values(), [])}) == 1485
    for row in (
        rows["arc"] + rows["mmlu"] + unseen_rows["mmlu_dev"]
    ):  # the keyed option, as the request lists it
        request, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        assert f"\n{reply}" in request and reply[0] == "(" and reply[2] == ")"
    first_bbh = {r["id"] for r in rows["bbh"]}
    bbh_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "bbh"
    for row in unseen_rows["bbh_rest"]:  # a BBH row as published, one the first set's sample left out
        assert row["id"] not in first_bbh
        task, index = row["id"].removeprefix("bbh-").rsplit("-", 1)
        example = json.loads((bbh_dir / f"{task}.json").read_text())["examples"][int(index)]
        assert [m["content"] for m in row["messages"]] == [example["input"], example["target"]]
    third_rows = written_set("third")  # other languages, the rest of MMLU test, BBH's worked shots
    assert {name: len(r) for name, r in third_rows.items()} == {
        "tydiqa_russian": 300, "tydiqa_korean": 276, "tydiqa_arabic": 300, "mmlu_rest": 300, "bbh_cot": 81
    }  # fmt: skip
    seen = {r["id"] for source in (rows, unseen_rows) for r in sum(source.values(), [])}
    assert not seen & {r["id"] for r in sum(third_rows.values(), [])}
    for row in third_rows["bbh_cot"]:  # a worked shot: the question, then its reasoning and answer
        request, reply = (m["content"] for m in row["messages"])
        assert (
            reply.startswith("Let's think step by step.") and "So the answer is" in reply.rsplit("\n", 1)[-1]
        )
        assert "\nA: " not in request and "Q: " not in reply
    assert write("--set", "unseen", out=corpus).returncode != 0  # not into the first set's folder
    done = write("--set", "unseen", "--per-source", "100000", out=tmp_path / "all")  # nothing left out
    assert done.returncode != 0 and "bbh" in done.stderr and not (tmp_path / "all").exists()

    stdout, report = run_benchmark(
        "loko.py",
        tmp_path,
        *("--tiny", "--seeds", "0", "--bases", "strong", "--regimes", "fast"),
        *("--data-dir", str(corpus), "--work-dir", str(tmp_path / "work")),
        timeout=600,
    )
    assert set(report["clean_over_redundancy_tolerance"]) == set(rows)
    assert "level with perplexity" in stdout


def test_loko_pairs_with_perplexity_over_seeds_not_runs(monkeypatch):
    """A seed's two stage-1 regimes are one draw of its corpus and base model (a recipe without gate terms
    scores both alike): item 9's paired test and ``--merge`` average them before the standard error, which
    counting them as two runs would shrink."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from loko import by_seed, paired_standard_error

    per_run = {
        "small/weak/fast/seed0": -0.003, "small/weak/seed/seed0": -0.003,
        "small/weak/fast/seed1": 0.001, "small/weak/seed/seed1": 0.001,
        "small/weak/fast/seed2": math.nan,  # a dataset without an AUROC in that run
    }  # fmt: skip
    diff = by_seed(per_run)
    assert diff.tolist() == pytest.approx([-0.003, 0.001])
    assert paired_standard_error(diff) == pytest.approx(0.002)
    runs = np.array([v for v in per_run.values() if not math.isnan(v)])
    assert paired_standard_error(runs) < 0.0012  # the runs as if independent


def test_loko_merge_pairs_each_recipe_with_perplexity_over_the_runs_of_several_files(tmp_path):
    """``--merge`` joins the committed five seeds (two files) per size/base; on one file its means agree
    with that file's own analysis (per regime, equal runs each); a run in two files is refused."""
    results = BENCHMARKS / "results"
    two = [str(results / "loko_sizes_plateau.json"), str(results / "loko_sizes_plateau_seeds234.json")]
    stdout, merged = run_benchmark("loko.py", tmp_path, "--merge", *two)
    assert "20 runs of 2 files" in stdout
    rows = {(r["runs"], r["scorer"]): r for r in merged["by_size_base"]}
    assert {r["runs"] for r in rows.values()} == {"small/plateau", "medium/plateau"}
    assert {r["n_runs"] for r in rows.values()} == {10}
    z_sum = rows[("medium/plateau", "-1 x z(NLL) + 1 x z(prompt gain)")]  # the default of those runs
    perplexity = rows[("medium/plateau", "perplexity (-NLL, base model)")]
    paired = z_sum["planted vs perplexity"]
    assert paired["mean"] == pytest.approx(z_sum["planted"] - perplexity["planted"])
    assert paired["standard_error"] > 0 and 0 <= paired["runs_not_below"] <= 10

    _, one = run_benchmark("loko.py", tmp_path, "--merge", two[1])
    analysed = json.loads(Path(two[1]).read_text())
    for row in one["by_size_base"]:
        label = next(label for label, recipe in analysed["named"].items() if recipe == row["scorer"])
        regimes = [
            g
            for g in analysed["by_group"]
            if g["scorer"] == label and g["runs"].startswith(row["runs"] + "/")
        ]
        assert len(regimes) == 2
        for metric in ("planted", "within_datasets", "unseen", "precision_at_5pct"):
            assert row[metric] == pytest.approx(sum(g[metric] for g in regimes) / 2)

    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "loko.py"), "--merge", two[1], two[1]],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "is in an earlier --merge file too" in refused.stderr


def test_lm_plateau_small(tmp_path):
    stdout, report = run_benchmark("lm_plateau.py", tmp_path, "--steps", "2", "4")
    assert "shortest length within 2% of the lowest held-out loss" in stdout
    assert [r["steps"] for r in report["results"]] == [2, 4] and report["plateau_steps"] in (2, 4)
    assert all(r["held_out_loss"] > 0 for r in report["results"])
    work = tmp_path / "loko"
    _, real = run_benchmark("lm_plateau.py", tmp_path, "--corpus", "real", "--rows", "20", "--steps", "2", "3",
                            "--work-dir", str(work))  # fmt: skip
    assert [r["steps"] for r in real["results"]] == [2, 3]
    assert len(list((work / "models").glob("base_*"))) == 2  # where loko.py finds its bases
    # --lm-rows: the base learns from that many rows outside the corpus (a new base), judged on the same corpus
    _, more = run_benchmark("lm_plateau.py", tmp_path, "--corpus", "real", "--rows", "20", "--lm-rows", "50",
                            "--steps", "2", "--work-dir", str(work))  # fmt: skip
    assert (more["lm_rows"], more["held_out_rows"]) == (50, real["held_out_rows"])
    assert len(list((work / "models").glob("base_*"))) == 3
    # --tokenizer-vocab: a new base with a BPE of that size trained on its LM rows, same held-out rows
    before = set((work / "models").glob("base_*"))
    _, own = run_benchmark("lm_plateau.py", tmp_path, "--corpus", "real", "--rows", "20", "--lm-rows", "50",
                           "--tokenizer-vocab", "300", "--steps", "2", "--work-dir", str(work))  # fmt: skip
    assert own["held_out_rows"] == real["held_out_rows"]
    (base,) = set((work / "models").glob("base_*")) - before
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 300


@pytest.mark.timeout(660)  # a sweep of Ray Train runs: from 57 s to over 280 s on this 2-core machine
def test_sweep_search_small(tmp_path):
    """One short trial of the shipped search's keys: the script's own corpus, probe baseline and table
    (several trials, ASHA and resume are test_sweep.py's)."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "training.quality_loss_type: {choice: [sigmoid, mse]}\n"
        "training.learning_rate: {loguniform: [1.0e-3, 1.0e-2]}\n"
        "training.max_steps: {choice: [3, 4]}\n"
    )
    stdout, report = run_benchmark(
        "sweep_search.py",
        tmp_path,
        *(
            "--rows",
            "200",
            "--lm-steps",
            "5",
            "--num-samples",
            "1",
            "--max-steps",
            "6",
            "--grace-period",
            "2",
        ),
        *(
            "--probe-rows",
            "64",
            "--work-dir",
            str(tmp_path / "work"),
            "--models-dir",
            str(tmp_path / "models"),
        ),
        timeout=600,
    )
    assert "Sweep trials, best first" in stdout and "--variant best:" in stdout
    assert len(report["trials"]) == 1 and 0 <= report["trials"][0]["metric"] <= 1
    assert 0 <= report["perplexity_probe_auroc"] <= 1


def test_real_shape_build_writes_loadable_checkpoints_in_the_hub_layout(tmp_path):
    """The mini shape runs the real-shape build's code: per-expert tensor names as on the hub, shards
    with an index, and the product loads the OLMoE one with only the quality gates new."""
    from safetensors import safe_open

    from selectmoe.models.loading import load_select_moe

    out = tmp_path / "ckpt"
    stdout, report = run_benchmark(
        "real_shape.py", tmp_path, "build", str(out), "--shape", "mini", "--shard-gb", "0.0005"
    )
    assert "peak RSS of this process" in stdout
    olmoe = out / "olmoe-1b-7b"
    index = json.loads((olmoe / "model.safetensors.index.json").read_text())["weight_map"]
    assert (
        "model.layers.1.mlp.experts.7.down_proj.weight" in index
        and report["models"]["olmoe-1b-7b"]["shards"] > 1
    )
    with safe_open(str(olmoe / index["model.layers.0.mlp.experts.0.gate_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.0.gate_proj.weight").shape == (32, 64)  # (I, H)
    model = load_select_moe(str(olmoe), dtype="bfloat16")  # raises on any missing key but the gates
    assert model.config.num_experts == 8 and model.dtype.is_floating_point
    # one model, with a tokenizer copied from a folder (a machine without mistral-common)
    only = tmp_path / "only_olmoe"
    run_benchmark(
        "real_shape.py", tmp_path, "build", str(only), "--shape", "mini",
        "--models", "olmoe-1b-7b", "--tokenizer", str(olmoe),
    )  # fmt: skip
    assert sorted(p.name for p in only.iterdir()) == ["olmoe-1b-7b"]
    assert (only / "olmoe-1b-7b" / "tokenizer.json").read_bytes() == (olmoe / "tokenizer.json").read_bytes()


@pytest.mark.timeout(1200)
def test_real_shape_run_takes_every_stage_through_the_cli(tmp_path):
    """The mini shape of ``real_shape.py run``: each stage's CLI in its own local Ray, every process of
    its tree sampled and named by its Ray role, the stage's own load/step numbers, and the alternating
    throughput loops on the same rows. (``pretrain_lora``, ``finetune`` and ``evaluate`` are left out for
    CI time: the script runs them as it runs ``pretrain_full_rank``; test_pretrain, test_finetune and
    test_evaluate cover those stages.)"""
    models = tmp_path / "ckpt"
    run_benchmark("real_shape.py", tmp_path, "build", str(models), "--shape", "mini")
    stdout, report = run_benchmark(
        "real_shape.py",
        tmp_path,
        "run",
        str(models),
        *("--rows", "24", "--throughput-rows", "8", "--steps", "1"),
        *("--stages", "pretrain_full_rank", "select", "throughput"),
        timeout=600,
    )
    stages = report["stages"]
    assert list(stages) == ["pretrain_full_rank", "select"]
    assert all(stage["rc"] == 0 for stage in stages.values())
    roles = {"pretrain_full_rank": "Train worker", "select": "scoring actor"}
    for name, role in roles.items():
        process = stages[name]["processes"][role]
        assert process["peak_rss_gib"] >= process["peak_anon_gib"] > 0, name
        assert stages[name]["processes"]["driver"]["peak_rss_gib"] > 0
    assert stages["pretrain_full_rank"]["load_s"] > 0 and stages["pretrain_full_rank"]["step_s"] > 0
    # stage 1 writes only the trained gates and routers (full_rank) or a LoRA adapter, not the model
    assert stages["pretrain_full_rank"]["trainable_bytes"] < report["model_bytes"]["olmoe-1b-7b"] / 5
    assert stages["select"]["rows_scored"] == 24
    throughput = report["throughput"]
    assert set(throughput["speedup_vs_seed"]) == {"seed loop", "original preset", "default preset"}
    # a share of a peak timed in the same run: any bound above 0 is a timing assert (on a CPU without bf16
    # instructions the bf16 "peak" is emulated and the share came out 3.6)
    assert all(share > 0 for share in throughput["share_of_peak"].values())
    assert "stage-2 throughput on cpu" in stdout
    # a second run measures the stage again, not a resume of the first run's parts
    _, again = run_benchmark(
        "real_shape.py", tmp_path, "run", str(models), "--rows", "24", "--stages", "select", timeout=300
    )
    assert again["stages"]["select"]["rows_scored"] == 24
    assert stages["select"]["rows_scored_before"] == again["stages"]["select"]["rows_scored_before"] == 0


FILTERS_WITH_AND_WITHOUT_REDUNDANCY = (
    "filtered_random_raw_nll_quartile_prompt_gain",
    "filtered_random_raw_nll_quartile_prompt_gain_redundancy",
)


@pytest.mark.timeout(660)  # its script may take 600 s (run_benchmark's timeout below)
def test_downstream_proxy_small(tmp_path):
    stdout, report = run_benchmark(
        "downstream_proxy.py",
        tmp_path,
        *("--seeds", "0", "--work-dir", str(tmp_path / "work"), "--families", "3", "--real-rows", "60"),
        *("--lm-steps", "5", "--stage1-steps", "2", "--steps", "4", "--random-draws", "2", "--draws", "2"),
        *("--percentage", "0.1", "--clean-rows", "60", "--defect-kinds", "garbled", "wrong_answer", "looped"),
        timeout=600,
    )
    assert "proxy valid in every seed:" in stdout and "clean-reply measure valid in every seed:" in stdout
    assert "junk preference measure valid:" in stdout
    assert isinstance(report["summary"]["junk_measure_valid"], bool)
    seed = report["per_seed"][0]
    methods = seed["methods"]
    assert set(methods) == {
        "random", "full", "oracle", "perplexity", "gates", "gates_prompt_gain", "gates_prompt_gain_balanced",
        "filtered_random_nll_prompt_gain", "filtered_random_nll", "filtered_random_nll_8x_prompt_gain",
        "filtered_random_raw_nll_prompt_gain", "filtered_random_raw_nll_capped_prompt_gain",
        "filtered_random_raw_nll_quartile_prompt_gain", "filtered_random_raw_nll_quartile_prompt_gain_redundancy",
        "filtered_random_raw_nll_quartile_prompt_gain_redundancy_commonness",
        "balanced_random", "similarity", "calibrated", "clean_random", "clean_balanced_random", "diversity",
        "diversity_random_order", "filtered_random_pooled", "filtered_random_by_cluster", "cluster_balanced_random",
        "filtered_random_by_length", "filtered_random_by_reply", "filtered_random_raw_prompt_gain_redundancy",
        "filtered_random_keep70", "filtered_random_keep85", "filtered_random_by_reply_without_nll",
    }  # fmt: skip
    # the junk filter's ceiling: only clean rows, as many as every 5% selection; every finetune is also
    # judged on the held-out clean replies
    assert methods["clean_random"]["clean_share"] == methods["clean_balanced_random"]["clean_share"] == 1.0
    assert methods["clean_balanced_random"]["target_rows"] == methods["balanced_random"]["target_rows"]
    assert methods["clean_random"]["rows"] == methods["random"]["rows"]
    assert seed["clean_rows"] == 60
    assert all(v["clean_nll"] > 0 for v in methods.values())
    # the junk preference: per kind, spoiled minus clean per-token NLL of the same held-out clean replies
    # (a kind none of whose pairs fits 128 tokens whole is left out); the pool's kinds apart from the rest
    # (wrong_answer is planted but not judged)
    absent_kinds = {"shuffled", "swapped", "truncated", "empty_ish", "spam", "echo"}
    for v in methods.values():
        for draw in v["draws"]:
            kinds = draw["preference_per_kind"]
            assert {"garbled", "looped"} <= set(kinds) <= absent_kinds | {"garbled", "looped"}
            assert all(0 < kind["pairs"] <= 60 and 0 <= kind["accuracy"] <= 1 for kind in kinds.values())
            planted = (kinds["garbled"]["margin"] + kinds["looped"]["margin"]) / 2
            assert draw["junk_margin"] == pytest.approx(planted)
            absent = [kinds[k]["margin"] for k in absent_kinds & set(kinds)]
            assert draw["absent_kinds_junk_margin"] == pytest.approx(sum(absent) / len(absent))
    default = report["summary"]["default"]
    assert default in methods and default.startswith("filtered_random")
    assert methods["calibrated"]["rows"] == methods[default]["rows"]
    assert methods["similarity"]["rows"] < methods["full"]["rows"] <= seed["pool_rows"]
    assert methods["oracle"]["target_rows"] == methods["oracle"]["rows"] > 0
    assert methods["similarity"]["rows"] == methods[default]["rows"]
    # the seed's diversity selection, a draw per --draws, as many rows as the default; in a random order
    # it picks other rows than in the default's score order
    for method in ("diversity", "diversity_random_order"):
        assert [d["rows"] for d in methods[method]["draws"]] == [methods[default]["rows"]] * 2
    assert methods["diversity"]["target_nll"] != methods["diversity_random_order"]["target_nll"]
    # the default's filter with the pool as one dataset, with each diversity draw's clusters as the
    # datasets (filtered or not), with each dataset's length quarters or its frequent replies, keeping
    # more of each dataset: as many rows as the default, other rows than each other
    strata = (
        "filtered_random_pooled", "filtered_random_by_cluster", "cluster_balanced_random",
        "filtered_random_by_length", "filtered_random_by_reply", "filtered_random_keep70", "filtered_random_keep85",
    )  # fmt: skip
    by_dataset = report["summary"]["default_score"]  # the default's score over the dataset strata
    assert by_dataset != default == "filtered_random_by_reply"  # the default's strata: frequent replies
    for method in strata:
        assert [d["rows"] for d in methods[method]["draws"]] == [methods[default]["rows"]] * 2
    # (the reply strata part from the dataset strata only where a reply repeats: tests/test_select.py)
    others = [method for method in strata if method != default]
    assert len({methods[method]["target_nll"] for method in (by_dataset, *others)}) == 7
    # family rows: the target families' rows are among them, the oracle holds nothing else, the full pool
    # holds every family's 3 templates x 32 words
    assert all(
        d["target_rows"] <= d["family_rows"] <= d["rows"] for v in methods.values() for d in v["draws"]
    )
    assert methods["oracle"]["family_rows"] == methods["oracle"]["rows"]
    assert methods["full"]["family_rows"] == 3 * 3 * 32
    # what the clean real rows kept are like: the oracle keeps none; the full pool holds each real
    # dataset's commonest replies
    assert methods["oracle"]["common_reply_share"] is methods["oracle"]["clean_real_reply_chars"] is None
    assert 0 < methods["full"]["common_reply_share"] <= 1 and methods["full"]["clean_real_reply_chars"] > 0
    # each diversity draw's clusters partition the scored pool: its rows, its family rows, each row one kind
    assert len(seed["diversity_clusters"]) == 2
    for draw in seed["diversity_clusters"]:
        assert sum(c["rows"] for c in draw) == methods["full"]["rows"]
        assert sum(c["family_rows"] for c in draw) == methods["full"]["family_rows"]
        assert all(sum(c["kinds"].values()) == c["rows"] for c in draw)
    clusters = report["summary"]["diversity_clusters"]
    assert clusters["draws"] == 2 and 0 <= clusters["family_rows_in_them"] <= 1
    assert all(0 <= v["kind_rows_in_them"] <= 1 for v in clusters["kind_majority_clusters"].values())
    # every drawn method is judged by the mean of its own seeded draws, each a finetune of its own
    for method, draws in (
        ("random", 2),
        ("balanced_random", 2),
        (default, 2),
        ("clean_random", 2),
        ("gates", 1),
    ):
        judged = methods[method]["draws"]
        assert len(judged) == draws, method
        assert methods[method]["target_nll"] == pytest.approx(sum(d["target_nll"] for d in judged) / draws)
    assert methods["random"]["draws"][0]["target_nll"] != methods["random"]["draws"][1]["target_nll"]
    # the balanced draw keeps the pool's mix: its target rows are the pool's share of the selection
    assert (
        methods["balanced_random"]["draws"][0]["target_rows"]
        == methods["balanced_random"]["draws"][1]["target_rows"]
    )
    summary = report["summary"]["methods"]
    margin = summary[default]["target_nll_margin_vs_random"]
    assert margin["mean"] == pytest.approx(methods["random"]["target_nll"] - methods[default]["target_nll"])
    assert margin["se"] > 0
    assert "target_nll_margin_vs_random" not in summary["random"]
    assert summary[default]["target_nll_margin_vs_balanced_random"]["se"] > 0
    # a higher junk margin is better: the margin vs random is the method's minus random's
    junk = summary[default]["junk_margin_margin_vs_random"]
    assert junk["mean"] == pytest.approx(methods[default]["junk_margin"] - methods["random"]["junk_margin"])
    # what each selection keeps, per kind of pool row: the pool's kinds with their mean terms, and a keep
    # rate per kind (share of the selection over share of the pool): the perfect filter keeps no junk
    kinds = seed["pool_kinds"]
    assert set(kinds) == {"clean", "garbled", "wrong_answer", "looped"}
    assert sum(kind["rows"] for kind in kinds.values()) == methods["full"]["rows"]  # the rows stage 2 scored
    assert all(math.isfinite(kind["nll"]) and math.isfinite(kind["prompt_gain"]) for kind in kinds.values())
    # a loop repeats its reply, and the redundancy term keeps looped rows no more often than the same
    # filter without it
    assert kinds["looped"]["reply_redundancy"] > kinds["clean"]["reply_redundancy"]
    assert all(0 <= kind["reply_commonness"] <= 1 for kind in kinds.values())
    kept = {m: summary[m]["keep_rate_per_kind"]["looped"] for m in FILTERS_WITH_AND_WITHOUT_REDUNDANCY}
    assert kept[FILTERS_WITH_AND_WITHOUT_REDUNDANCY[1]] <= kept[FILTERS_WITH_AND_WITHOUT_REDUNDANCY[0]]
    perfect = summary["clean_balanced_random"]["keep_rate_per_kind"]
    assert perfect["garbled"] == perfect["looped"] == 0 and perfect["clean"] > 1
    assert summary["full"]["keep_rate_per_kind"] == pytest.approx(dict.fromkeys(kinds, 1.0))
    draw = methods[default]["draws"][0]
    assert sum(draw["kind_counts"].values()) == draw["rows"]
    assert draw["clean_share"] == draw["kind_counts"].get("clean", 0) / draw["rows"]


def test_commonness_by_kind_small(tmp_path):
    """Model-free: on real rows with planted kinds and on the demo's corpus, every kind's rows and AUROC;
    canned replies, all shared text, are flagged and rank below clean rows within every dataset."""
    stdout, report = run_benchmark(
        "commonness_by_kind.py",
        tmp_path,
        *("--seeds", "0", "--real-rows", "400", "--demo-rows", "600", "--kinds", "canned", "garbled"),
    )
    real = report["corpora"]["real_seed0"]
    assert set(report["corpora"]) == {"real_seed0", "demo"}
    assert set(real["auroc_within_datasets"]) == {"canned", "garbled"}
    assert real["auroc_within_datasets"]["canned"] > 0.9 and real["common_ngrams"] > 0
    canned = [v["kinds"]["canned"] for v in real["by_dataset"].values() if "canned" in v["kinds"]]
    assert all(cell["above_tolerance"] > 0.5 for cell in canned)
    assert sum(v["rows"] for v in real["by_dataset"].values()) == real["rows"]
    assert "wrong_answer" in report["corpora"]["demo"]["auroc_within_datasets"]  # the demo plants every kind
    assert "canned" in stdout and "AUROC" in stdout


def test_redundancy_rates_small(tmp_path):
    """Model-free, per dataset: clean replies and the same rows echoed, restated, looped and doubled, each
    rule's share flagged. A multiple-choice answer copies one option: flagged by neither rule. An answer
    copying most of a short passage: flagged by the product's rule, not by a content-only share of 0.9. A
    request echoed: flagged by both."""
    passage = "The Nile, at 6,650 km, is the longest river in Africa and flows north into the Mediterranean"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, request, reply in (
        ("mmlu", "Which planet is largest?\n(A) Mars\n(B) Jupiter\n(C) Venus\n(D) Earth", "(B) Jupiter"),
        ("tydiqa", f"{passage}.\n\nQuestion: Which river is the longest in Africa?", passage),
    ):
        row = {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]}
        lines = [json.dumps({**row, "id": f"{name}-{i}", "dataset": name}) for i in range(12)]
        (corpus / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    stdout, report = run_benchmark(
        "redundancy_rates.py", tmp_path, str(corpus), *("--rows", "10", "--thresholds", "0.6", "0.9")
    )
    rates = report["folders"][str(corpus)]
    assert set(rates) == {"mmlu", "tydiqa"} and report["tolerance"] == 0.4
    for dataset in rates.values():
        assert set(dataset) == {"clean", "echo", "restated", "looped", "doubled"}
        assert all(cell["rows"] == 10 for cell in dataset.values())
        assert dataset["echo"]["product"] == dataset["echo"]["content_0.9"] == 1.0
    assert rates["mmlu"]["clean"] == {"rows": 10, "product": 0.0, "content_0.6": 0.0, "content_0.9": 0.0}
    assert rates["tydiqa"]["clean"] == {"rows": 10, "product": 1.0, "content_0.6": 1.0, "content_0.9": 0.0}
    assert "share flagged" in stdout


def test_prompt_gain_spans_small(tmp_path):
    """Per base and seed, every aggregation's AUROC per kind (each of the gain's also with the length out),
    and their mean over seeds with the later kinds' mean; every planted kind has rows, and clean rows remain."""
    stdout, report = run_benchmark(
        "prompt_gain_spans.py",
        tmp_path,
        *("--seeds", "0", "--lm-steps", "2", "--rows", "120", "--windows", "4", "--work-dir", str(tmp_path)),
        *("--kinds", "garbled", "cited", "falsified"),
    )
    assert set(report["runs"]) == {"lm2/seed0"} and set(report["summary"]) == {"lm2"}
    run = report["runs"]["lm2/seed0"]
    assert set(run["kind_rows"]) == {"garbled", "cited", "falsified"} and min(run["kind_rows"].values()) > 0
    assert sum(run["kind_rows"].values()) < run["rows"]  # clean rows too
    of_gain = {"prompt gain", "gain q10", "gain q25", "min 4-token gain"}
    expected = {"-NLL (product)", "prompt gain (product)", "-length", *(of_gain - {"prompt gain"})}
    assert expected | {f"{name}, length out" for name in of_gain} == set(run["auroc"])
    for cells in report["summary"]["lm2"].values():
        assert set(cells) == {"garbled", "cited", "falsified", "later kinds mean"}
        assert all(0 <= value <= 1 for value in cells.values())
        assert cells["later kinds mean"] == pytest.approx((cells["cited"] + cells["falsified"]) / 2)
    assert "min 4-token gain, length out" in stdout and "later mean" in stdout


@pytest.mark.timeout(900)
def test_less_protocol_tiny(tmp_path):
    """The LESS protocol's script end to end at a tiny shape: one stage 1; similarity to the evaluations'
    own shots and a random draw (reusing the default's stage-2 scores), each finetuned and evaluated
    (one task here; the protocol's three by default). The calibrated mode and the default run the same
    stage code (tested in test_select.py and test_pipeline.py)."""
    work = tmp_path / "work"
    # one evaluation task and two methods keep it short (lm-eval starts once per task and method)
    args = (
        *("--tiny", "--work-dir", str(work), "--random-seeds", "0", "--tiny-rows", "100"),
        *("--methods", "similarity", "--set", "evaluate.eval.tasks=[mmlu_local_anatomy]"),
    )
    stdout, report = run_benchmark("less_protocol.py", tmp_path, *args, timeout=600)
    assert set(report["runs"]) == {"random_0", "similarity"}
    for method, run in report["runs"].items():
        assert set(run["metrics"]) == {"mmlu_local_anatomy"}, method
        assert run["selected_rows"] == report["runs"]["similarity"]["selected_rows"] > 0
    assert len(list(work.glob("**/stage_1_pretrain/manifest.json"))) == 1  # one shared stage 1
    assert (work / "default" / "stage_2_select" / "manifest.json").exists()  # scored once, for the draws
    similar = (work / "similarity" / "stage_2_select" / "selected.jsonl").read_text().splitlines()
    assert {json.loads(line)["target_task"] for line in similar} == {"bbh", "mmlu", "tydiqa"}
    summary = report["summary"]
    assert summary["random_draws"] == 1 and set(summary["methods"]) == {"similarity"}
    assert "| random (1 draws) |" in stdout


def test_data_plane_scale_small(tmp_path):
    """Two layouts of a generated corpus with planted duplicates and broken lines through validate-data,
    pieces forced small: the counts come back the same from one file and from several."""
    stdout, report = run_benchmark(
        "data_plane_scale.py",
        tmp_path,
        *("--rows", "2500", "--files", "3", "--split-bytes", "200000"),
        *("--duplicate-every", "1000", "--bad-every", "700", "--work-dir", str(tmp_path / "work")),
    )
    assert "ratio now, 2500 rows: rows/s one file / many files:" in stdout
    one, many = report["runs"]
    assert (one["layout"], many["layout"]) == ("one file", "3 files")
    assert one["counts"] == many["counts"]
    assert one["counts"]["rejected_by_reason"] == {"bad_json": 3, "duplicate_id": 1}
    assert one["counts"]["rows_read"] == 2500 and one["driver_peak_rss_gib"] > 0


def test_data_plane_scale_select_resumes_to_the_same_selection(tmp_path):
    """``--select``: stage 2 from scratch on one file read in several pieces, then resumed with every
    other score file deleted: the rerun rescores those rows only and writes the same selection."""
    stdout, report = run_benchmark(
        "data_plane_scale.py",
        tmp_path,
        *("--select", "--one-file-only", "--rows", "600", "--split-bytes", "100000", "--sort-window", "64"),
        *("--duplicate-every", "250", "--bad-every", "400", "--work-dir", str(tmp_path / "work")),
    )
    assert "select end to end" in stdout
    fresh, resumed = report["runs"]
    assert (fresh["code"], resumed["code"]) == ("fresh", "resumed")
    assert fresh["counts"] == resumed["counts"] and fresh["counts"]["rows_selected"] > 0
    assert fresh["counts"]["rows_scored"] == fresh["counts"]["rows_accepted"]
    assert 0 < resumed["rows_rescored"] < fresh["counts"]["rows_scored"]
    assert resumed["same_selection"]
    assert 0 < fresh["driver_peak_private_gib"] <= fresh["driver_peak_rss_gib"]
    assert fresh["phases_s"].keys() >= {
        "reading and checking rows",
        "selecting and writing the selected rows",
    }
    assert 0 < fresh["first_score_file_s"] < fresh["wall_s"]  # before the command ended


def test_data_plane_scale_times_a_training_stages_read(tmp_path):
    """``--train-stage finetune``: stage 3 for one step on the tiny target, its read phase timed, the rows
    it read and rejected counted as validate-data counts them."""
    stdout, report = run_benchmark(
        "data_plane_scale.py",
        tmp_path,
        *("--train-stage", "finetune", "--one-file-only", "--rows", "600", "--split-bytes", "100000"),
        *("--bad-every", "400", "--work-dir", str(tmp_path / "work")),
    )
    assert "finetune end to end" in stdout
    (run,) = report["runs"]
    assert run["counts"]["rows_read"] == 600
    assert "bad_json" in run["counts"]["rejected_by_reason"]  # the planted broken line
    assert run["phases_s"].keys() >= {"reading and tokenising rows"}

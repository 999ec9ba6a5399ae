"""Stage 4: presets, the offline lm-eval tasks on the real eval sets, a tiny Llama + LoRA adapter
evaluated through Ray and lm-eval for real, and the comparison table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selectmoe.config import ConfigError, EvalSection, EvaluateConfig, TargetModelConfig
from selectmoe.evaluate.driver import (
    LOCAL_VERSIONS,
    PRESETS,
    EvalJob,
    evaluate,
    expand_tasks,
    lm_eval_model_args,
)
from selectmoe.evaluate.results import results_table
from selectmoe.evaluate.tasks import available_local_tasks, write_local_tasks
from selectmoe.evaluate.tasks.bbh_local import bbh
from selectmoe.evaluate.tasks.gsm8k_local import gsm8k
from selectmoe.evaluate.tasks.tydiqa_local import tydiqa
from selectmoe.reporting.compare import compare_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
# a slice of the shared eval sets: two MMLU subjects, two BBH tasks, one TyDi QA language
EVAL_SUBSET = [
    "mmlu/dev/anatomy_dev.csv",
    "mmlu/test/anatomy_test.csv",
    "mmlu/dev/abstract_algebra_dev.csv",
    "mmlu/test/abstract_algebra_test.csv",
    "bbh/navigate.json",
    "bbh/cot-prompts/navigate.txt",
    "bbh/object_counting.json",
    "bbh/cot-prompts/object_counting.txt",
    "tydiqa/english_tydiqa_dev.json",
    "arc/ARC-Challenge-Test.jsonl",
    "arc/ARC-Challenge-Dev.jsonl",
    "gsm8k/test.jsonl",
]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------------- presets


def test_less_preset_uses_hub_tasks_with_their_shots():
    assert expand_tasks(["less"]) == [
        EvalJob("mmlu", 5),
        EvalJob("bbh_cot_fewshot", 3),
        EvalJob("tydiqa_goldp", 1),
    ]


def test_presets_map_to_local_tasks_with_data_dir():
    assert expand_tasks(["less"], data_dir="/data/eval") == [
        EvalJob("mmlu_local", 5),
        EvalJob("bbh_local", 3),
        EvalJob("tydiqa_local", 1),
    ]


def test_named_tasks_with_a_local_version_map_to_it_with_data_dir():
    """Offline, ``eval.tasks=[arc_challenge]`` would fail reaching the hub; it runs the local copy."""
    jobs = expand_tasks(["arc_challenge", "winogrande"], data_dir="/data/eval")
    assert jobs == [EvalJob("arc_challenge_local"), EvalJob("winogrande")]


def test_seed_preset_without_local_versions_fails_naming_them():
    assert [job.task for job in expand_tasks(["seed"])] == ["mmlu", "hellaswag", "arc_easy", "arc_challenge"]
    with pytest.raises(ConfigError, match=r"hellaswag', 'arc_easy'.*mmlu_local,arc_challenge_local"):
        expand_tasks(["seed"], data_dir="/data/eval")


def test_names_pass_through_and_num_fewshot_overrides_presets():
    jobs = expand_tasks(["winogrande", "less", "mmlu"], num_fewshot=0)
    assert jobs == [
        EvalJob("winogrande", 0),
        EvalJob("mmlu", 0),
        EvalJob("bbh_cot_fewshot", 0),
        EvalJob("tydiqa_goldp", 0),
    ]


def test_preset_and_replaced_names_are_lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert {task for members in PRESETS.values() for task, _ in members} | set(LOCAL_VERSIONS) <= known


def test_local_task_without_its_data_fails_before_ray(tmp_path):
    cfg = EvaluateConfig(output_dir=str(tmp_path), eval=EvalSection(tasks=["mmlu_local"]))
    with pytest.raises(ConfigError, match="set eval.data_dir"):
        evaluate(cfg)
    cfg.eval.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"no data for \['mmlu_local'\]"):
        evaluate(cfg)


def test_use_gpu_on_a_cluster_without_gpus_fails(tmp_path, ray_session):
    cfg = EvaluateConfig(
        output_dir=str(tmp_path), eval=EvalSection(tasks=["gsm8k_local"], data_dir=str(EVAL_DATA))
    )
    cfg.scaling.use_gpu = True
    with pytest.raises(ConfigError, match="no GPU"):
        evaluate(cfg)


# ---------------------------------------------------------------------------- offline task definitions


def test_local_tasks_cover_the_shared_eval_sets(tmp_path):
    assert available_local_tasks(EVAL_DATA) == [
        "mmlu_local",
        "bbh_local",
        "tydiqa_local",
        "arc_challenge_local",
        "gsm8k_local",
    ]
    write_local_tasks(EVAL_DATA, tmp_path, ["mmlu_local", "bbh_local", "tydiqa_local"])
    assert len(list((tmp_path / "mmlu_local").glob("mmlu_local_*.yaml"))) == 57
    assert len(list((tmp_path / "bbh_local").glob("bbh_local_*.yaml"))) == 27
    assert len(list((tmp_path / "tydiqa_local").glob("tydiqa_local_*.yaml"))) == 9


def test_bbh_cot_prompt_gives_description_and_three_shots():
    text = (EVAL_DATA / "bbh" / "cot-prompts" / "sports_understanding.txt").read_text()
    description, shots = bbh.parse_cot_prompt(text)
    assert description.startswith("Determine whether an artificially constructed sentence")
    assert len(shots) == 3
    assert shots[0]["input"].startswith("Is the following sentence plausible?")
    assert shots[0]["target"].endswith("So the answer is yes.")


def test_bbh_extraction_recovers_every_real_target():
    for data_file in sorted((EVAL_DATA / "bbh").glob("*.json")):
        targets = [example["target"] for example in json.loads(data_file.read_text())["examples"]]
        generations = [[f"Some reasoning. So the answer is {target}."] for target in targets]
        assert bbh.extract_answers(generations, []) == [[target] for target in targets], data_file.name


def test_answer_extraction():
    assert bbh.extract_answers([["Two steps. So the answer is (A). Q: next", "no phrase"]], [{}]) == [
        ["(A)", "no phrase"]
    ]
    assert gsm8k.extract_final_numbers([["so 3 + 4 = 7.\n#### 1,000.00"], ["it costs $18."]], [{}, {}]) == [
        ["1000"],
        ["18"],
    ]
    scores = tydiqa.process_results({"answers": ["the Eiffel Tower", "Eiffel"]}, ["Eiffel tower."])
    assert scores == {"exact_match": 1.0, "f1": 1.0}
    assert tydiqa.process_results({"answers": ["red rose"]}, ["a red car"])["f1"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_llama_with_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selectmoe.demo.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("tiny_llama")
    model_dir = build_tiny_llama(root / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter): give it weights that matter
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    lora.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


@pytest.mark.timeout(300)
def test_evaluate_loads_the_adapter_the_base_alone_scores_differently(tiny_llama_with_adapter):
    """The log-likelihoods lm-eval gets through stage 4's model arguments change with the adapter."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model_dir, adapter_dir = tiny_llama_with_adapter
    requests = [
        Instance("loglikelihood", {}, ("Question: what is 2 + 2?\nAnswer:", " 4"), 0),
        Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 1),
    ]

    def loglikelihoods(adapter):
        cfg = EvaluateConfig(model=TargetModelConfig(name=str(model_dir)), eval=EvalSection(adapter=adapter))
        lm = HFLM(**lm_eval_model_args(cfg, "cpu"), device="cpu", batch_size=2)
        return np.array([logprob for logprob, _ in lm.loglikelihood(requests)])

    base, adapted = loglikelihoods(None), loglikelihoods(str(adapter_dir))
    assert np.isfinite(base).all() and np.isfinite(adapted).all()
    assert np.abs(adapted - base).min() > 1e-3


@pytest.mark.timeout(300)
def test_evaluate_tiny_llama_with_adapter_on_every_local_task(
    tmp_path, ray_session, offline, tiny_llama_with_adapter, capsys
):
    model_dir, adapter_dir = tiny_llama_with_adapter
    data_dir = tmp_path / "eval"
    for relative in EVAL_SUBSET:
        (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EVAL_DATA / relative, data_dir / relative)
    cfg = EvaluateConfig(
        output_dir=str(tmp_path / "stage_4_evaluate"),
        model=TargetModelConfig(name=str(model_dir)),
        eval=EvalSection(
            adapter=str(adapter_dir),
            tasks=["less", "arc_challenge_local", "gsm8k_local"],
            data_dir=str(data_dir),
            limit=3,
            batch_size="4",
            max_gen_toks=4,
        ),
    )

    out = evaluate(cfg)

    results = json.loads((out / "results.json").read_text())
    metrics = results["results"]
    assert metrics["mmlu_local"]["sample_len"] == 6  # 3 per subject, 2 subjects
    assert 0 <= metrics["mmlu_local"]["acc,none"] <= 1
    assert "exact_match,get-answer" in metrics["bbh_local"]
    assert {"f1,none", "exact_match,none"} <= set(metrics["tydiqa_local"])
    assert {"acc,none", "acc_norm,none"} <= set(metrics["arc_challenge_local"])
    assert "exact_match,final-number" in metrics["gsm8k_local"]
    shots = results["n-shot"]
    assert (shots["mmlu_local_anatomy"], shots["bbh_local_navigate"], shots["tydiqa_local_english"]) == (
        5,
        3,
        1,
    )
    assert results["config"]["model_args"]["peft"] == str(adapter_dir)
    assert results["configs"]["gsm8k_local"]["generation_kwargs"]["max_gen_toks"] == 4

    table = (out / "results.md").read_text()
    assert "| mmlu_local | acc |" in table and "| bbh_local | exact_match (get-answer) |" in table
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate"
    assert manifest["counts"]["samples"] == 6 + 6 + 3 + 3 + 3
    assert "tydiqa_local/f1" in manifest["metrics"] and "mmlu_local_anatomy/acc" not in manifest["metrics"]


# ---------------------------------------------------------------------------- comparison


def _write_results(folder: Path, acc: float, f1: float) -> None:
    folder.mkdir(parents=True)
    results = {
        "results": {
            "mmlu_local": {"alias": "mmlu_local", "acc,none": acc, "acc_stderr,none": 0.01},
            "tydiqa_local": {"alias": "tydiqa_local", "f1,none": f1, "f1_stderr,none": "N/A"},
        }
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_compare_runs_gives_deltas_against_the_first_run(tmp_path):
    _write_results(tmp_path / "baseline", acc=0.40, f1=0.30)
    _write_results(tmp_path / "pipeline_run" / "stage_4_evaluate", acc=0.45, f1=0.25)

    table = compare_runs([str(tmp_path / "baseline"), str(tmp_path / "pipeline_run")])

    lines = table.splitlines()
    assert lines[0] == "| task | metric | baseline | pipeline_run | Δ pipeline_run |"
    assert lines[2] == "| mmlu_local | acc | 0.4000 ± 0.0100 | 0.4500 ± 0.0100 | +0.0500 |"
    assert lines[3] == "| tydiqa_local | f1 | 0.3000 | 0.2500 | -0.0500 |"
    assert (  # 0.05 > 2 x sqrt(0.01² + 0.01²) = 0.028; f1 has no standard error to judge by
        "pipeline_run: beyond noise (|Δ| over two standard errors of the difference) in 1 of 1 rows: "
        "mmlu_local acc (+0.0500); 1 without a standard error not judged." in lines
    )
    _write_results(tmp_path / "close", acc=0.42, f1=0.30)  # 0.02 < 0.028: noise
    close = compare_runs([str(tmp_path / "baseline"), str(tmp_path / "close")])
    assert "close: beyond noise (|Δ| over two standard errors of the difference) in 0 of 1 rows;" in close


def test_results_table_lists_filtered_metrics():
    results = {
        "results": {"bbh_local": {"exact_match,get-answer": 0.5, "exact_match_stderr,get-answer": 0.1}}
    }
    assert "| bbh_local | exact_match (get-answer) | 0.5000 | 0.1000 |" in results_table(results)


def test_less_shots_are_the_evaluations_shots_as_chat_rows():
    """``selection.target_eval_dir`` (preset=less_targets): MMLU's 5 dev questions per subject, BBH's 3
    CoT shots per task, TyDi QA's first question per language, each in the evaluation's own prompt and
    with the benchmark as its task."""
    import csv
    from collections import Counter

    from selectmoe.evaluate.tasks import less_shot_rows

    rows = less_shot_rows(EVAL_DATA)
    assert Counter(r["task"] for r in rows) == {
        "mmlu": 5 * len(list((EVAL_DATA / "mmlu" / "dev").glob("*_dev.csv"))),
        "bbh": 3 * len(list((EVAL_DATA / "bbh" / "cot-prompts").glob("*.txt"))),
        "tydiqa": len(list((EVAL_DATA / "tydiqa").glob("*_tydiqa_dev.json"))),
    }
    assert len({r["id"] for r in rows}) == len(rows) and all(r["dataset"] == r["task"] for r in rows)
    by_id = {r["id"]: r["messages"] for r in rows}
    with open(EVAL_DATA / "mmlu" / "dev" / "anatomy_dev.csv", newline="", encoding="utf-8") as fh:
        first = next(csv.DictReader(fh))
    assert by_id["mmlu_shot_anatomy_0"][0]["content"] == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        f"{first['question'].strip()}\nA. {first['choice0']}\nB. {first['choice1']}\nC. {first['choice2']}"
        f"\nD. {first['choice3']}\nAnswer:"
    )
    assert by_id["mmlu_shot_anatomy_0"][1]["content"] == "ABCD"[int(first["answer"])]
    prompt_file = (EVAL_DATA / "bbh" / "cot-prompts" / "boolean_expressions.txt").read_text(encoding="utf-8")
    user, reply = (m["content"] for m in by_id["bbh_shot_boolean_expressions_0"])
    description, question = user.split("\n\nQ: ", 1)
    assert description == "Evaluate the result of a random Boolean expression."
    assert f"Q: {question}\nA: {reply}\n\nQ: " in prompt_file  # the file's first shot, as written
    english = json.loads((EVAL_DATA / "tydiqa" / "english_tydiqa_dev.json").read_text())["data"][0]
    qa = english["paragraphs"][0]["qas"][0]
    user, reply = (m["content"] for m in by_id["tydiqa_shot_english"])
    assert user.endswith(f"Question: {qa['question']}\nAnswer:") and reply == qa["answers"][0]["text"]

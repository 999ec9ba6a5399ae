"""Config loader and CLI: overrides, the seed's keys, unknown keys, shipped YAMLs, help."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from selectmoe.cli import main
from selectmoe.config import (
    DEFAULT_YAML,
    STAGE_CONFIGS,
    ConfigError,
    check_preset_inputs,
    parse_config,
    parse_overrides,
)

# The seed project's documented keys (DESIGN.md), by the command that takes them.
SEED_KEYS = {
    "pretrain": [
        "seed=1",
        "output_dir=out",
        "tag=t",
        "selector_model.path=some/olmoe",
        "selector_model.tokenizer_name=some/tok",
        "dataset.data_dir=data",
        "dataset.dataset_names=[cot,flan_v2]",
        "dataset.data_path=a.jsonl",
        "dataset.subset_ratio=0.1",
        "dataset.max_sequence_length=1024",
        "training.peft_mode=lora",
        "training.learning_rate=1e-4",
        "training.batch_size=8",
        "training.per_device_batch_size=2",
        "training.epochs=2",
        "training.lora.r=8",
        "training.lora.lora_alpha=16",
        "training.lora.lora_dropout=0.0",
        "training.lora.target_modules=[gate,quality_gate]",
        "training.quality_loss_weight=0.5",
        "training.quality_gate_init_mean=0.1",
        "training.quality_gate_init_std=0.01",
        "training.trash_expert_mode=noise",
        "training.enable_load_balancing=true",
        "training.quality_loss_type=beta_moment_matching",
        "training.quality_loss_debug=true",
        "training.quality_loss_params.beta_target_mean=0.4",
        "training.quality_loss_params.beta_target_var=0.02",
        "training.quality_loss_params.w_mean=2",
        "training.quality_loss_params.w_var=3",
        "training.quality_loss_params.lambda_var=0.2",
        "training.quality_loss_params.sample_wise_averaging=true",
    ],
    "select": [
        "model_checkpoint_path=outputs/stage_1",
        "selection_percentage=0.1",
        "clustering_method=kmeans",
        "clustering_params.k=10",
        "clustering_params.auto_k=true",
        "clustering_params.k_range=[5,20]",
        "clustering_params.max_iters=50",
        "data_process.batch_size=16",
        "selector_model.path=x",
    ],
    "finetune": ["model.name=meta-llama/Llama-2-7b-hf", "training.lora.r=64", "training.lora.lora_alpha=128"],
}


@pytest.mark.parametrize("command", sorted(SEED_KEYS))
def test_seed_keys_are_accepted_and_typed(command):
    cfg = parse_config(command, overrides=SEED_KEYS[command])
    if command == "pretrain":
        assert cfg.training.learning_rate == 1e-4
        assert cfg.dataset.dataset_names == ["cot", "flan_v2"]
        assert cfg.dataset.data_path == ["a.jsonl"]  # a single path becomes a list
        assert cfg.training.quality_loss_params.sample_wise_averaging is True
        assert cfg.training.quality_loss_params.w_mean == 2.0
        assert cfg.training.lora.target_modules == ["gate", "quality_gate"]
    if command == "select":
        assert cfg.clustering_params.k_range == [5, 20]
        assert cfg.selection_percentage == 0.1
    if command == "finetune":  # overriding one LoRA key keeps the other LESS defaults
        assert cfg.training.lora.r == 64
        assert cfg.training.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert cfg.training.lora.lora_dropout == 0.1


def test_defaults_follow_the_seed_and_less():
    pre = parse_config("pretrain")
    assert (pre.training.learning_rate, pre.training.batch_size, pre.training.epochs) == (3e-4, 16, 4)
    assert pre.training.quality_loss_weight == 0.01 and pre.dataset.subset_ratio == 0.05
    fin = parse_config("finetune")
    assert (fin.training.lora.r, fin.training.lora.lora_alpha, fin.training.learning_rate) == (128, 512, 2e-5)
    assert fin.training.warmup_ratio == 0.03 and fin.training.batch_size == 128


def test_override_values_are_parsed_as_yaml():
    parsed = parse_overrides(["a.b=3", "a.c=1e-4", "d=[x, 2]", "e=true", "f=null", "g=hello world"])
    assert parsed == {"a": {"b": 3, "c": 1e-4}, "d": ["x", 2], "e": True, "f": None, "g": "hello world"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.quality_los_weight=1", "did you mean 'training.quality_loss_weight'"),
        ("traning.epochs=1", "did you mean 'training'"),
        ("selection_percentag=0.1", None),  # not a pretrain key at all
        ("training.epochs=two", "expected an integer"),
        ("training.gradient_checkpointing=maybe", "expected true/false"),
        ("scaling.strategy=zero3", "scaling.strategy='zero3': expected one of ['ddp', 'fsdp']"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        parse_config("pretrain", overrides=[override])
    assert override.split("=")[0].split(".")[0] in str(err.value)
    if message:
        assert message in str(err.value)


def test_config_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 2\n  learning_rate: 1.0e-3\n")
    cfg = parse_config("pretrain", str(path), ["training.epochs=3"])
    assert cfg.training.epochs == 3 and cfg.training.learning_rate == 1e-3
    assert cfg.training.batch_size == 16  # untouched keys keep their defaults


def test_every_shipped_yaml_loads_and_names_its_command():
    shipped = {
        p.name for p in (resources.files("selectmoe") / "configs").iterdir() if p.name.endswith(".yaml")
    }
    assert set(DEFAULT_YAML.values()) <= shipped
    for command, name in DEFAULT_YAML.items():
        text = (resources.files("selectmoe") / "configs" / name).read_text()
        assert text.startswith(f"# selectmoe {command}"), name
        assert isinstance(parse_config(command), STAGE_CONFIGS[command])


def test_cli_help_lists_commands_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in (
        "validate-data",
        "pretrain",
        "select",
        "finetune",
        "evaluate",
        "convert",
        "pipeline",
        "demo",
    ):
        assert command in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "training.quality_loss_weight = 0.01" in out


def test_cli_rejects_unknown_key_with_exit_code_2(capsys):
    assert main(["select", "selection_percentag=0.1"]) == 2
    assert "did you mean 'selection_percentage'" in capsys.readouterr().err


def test_cli_convert_writes_a_verified_checkpoint(tmp_path, capfd):
    from selectmoe.demo.tiny import build_tiny_olmoe

    olmoe = build_tiny_olmoe(tmp_path / "olmoe", hidden_size=32, intermediate_size=16)
    out = tmp_path / "converted"
    assert main(["convert", "--olmoe", str(olmoe), "--out", str(out), "--verify"]) == 0
    printed, shown = capfd.readouterr()
    assert "verify: max |logits(OLMoE) - logits(Select-MoE, gates open)|" in shown  # on the terminal
    assert printed.strip().splitlines() == [str(out)]  # stdout: the output dir alone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["max_abs_logit_diff_gates_open"] <= 1e-5
    assert json.loads((out / "config.json").read_text())["model_type"] == "select_moe"


def test_selection_preset_sets_the_recipe_under_explicit_keys():
    default = parse_config("pipeline")
    assert default.preset == "filtered_random"
    assert default.select.selection.method == "filtered_random"
    assert default.select.selection.keep_fraction == 0.5
    assert default.select.selection.strata == "auto"  # reply strata, for filtered_random
    assert default.select.scoring.combine == "raw" and default.select.scoring.gate_weight == 0.0
    assert default.select.scoring.prompt_gain_cap == "lower_quartile"
    assert default.select.scoring.nll_model == "base"
    assert default.select.scoring.perplexity_weight == 1.0
    assert default.select.scoring.prompt_gain_weight == 1.0
    former = parse_config("pipeline", overrides=["preset=gates_prompt_gain"])
    assert former.select.selection.method == "top_k" and former.select.scoring.combine == "raw"
    assert former.select.scoring.prompt_gain_cap == "none"
    assert former.select.scoring.nll_model == "stage1"
    assert former.select.scoring.gate_weight == 1.0
    assert former.select.scoring.perplexity_weight == 0.03
    assert former.select.scoring.prompt_gain_weight == 0.1
    reference = parse_config(
        "pipeline",
        overrides=["preset=reference", "pretrain.training.reference_data=[trusted.jsonl]"],
    )
    assert reference.pretrain.training.quality_loss_weight == 0.0
    assert reference.pretrain.training.reference_data == ["trusted.jsonl"]
    original = parse_config("pipeline", overrides=["preset=original"])
    assert original.pretrain.training.quality_loss_weight == 0.01
    assert original.pretrain.training.reference_data is None
    assert original.select.scoring.perplexity_weight == 0.0
    assert original.select.scoring.prompt_gain_weight == 0.0
    effect = parse_config("pipeline", overrides=["preset=gates_expert_effect"])
    assert effect.select.scoring.expert_effect_weight == 0.03
    assert effect.select.scoring.prompt_gain_weight == 0.1
    similarity = parse_config(
        "pipeline", overrides=["preset=similarity", "select.selection.targets=[mmlu.jsonl]"]
    )
    assert similarity.select.selection.method == "similarity"
    assert similarity.select.scoring.store_embeddings
    assert similarity.select.selection.targets == ["mmlu.jsonl"]
    with pytest.raises(ConfigError, match="preset=similarity needs select.selection.targets"):
        check_preset_inputs(parse_config("pipeline", overrides=["preset=similarity"]))
    less = parse_config(
        "pipeline", overrides=["preset=less_targets", "select.selection.target_eval_dir=/eval"]
    )
    assert less.select.selection.method == "similarity" and less.select.scoring.store_embeddings
    with pytest.raises(ConfigError, match="preset=less_targets needs select.selection.target_eval_dir"):
        check_preset_inputs(parse_config("pipeline", overrides=["preset=less_targets"]))
    calibrated = parse_config(
        "pipeline", overrides=["preset=calibrated", "select.selection.trusted=[t.jsonl]"]
    )
    assert calibrated.select.selection.method == "calibrated"
    assert calibrated.select.scoring.lm_loss and calibrated.select.scoring.prompt_gain
    with pytest.raises(ConfigError, match="preset=calibrated needs select.selection.trusted"):
        check_preset_inputs(parse_config("pipeline", overrides=["preset=calibrated"]))
    # an explicit key wins over the preset's value
    mine = parse_config(
        "pipeline", overrides=["preset=original", "pretrain.training.quality_loss_weight=1.0"]
    )
    assert mine.pretrain.training.quality_loss_weight == 1.0


def test_the_old_preset_key_still_works_and_says_it_is_deprecated(capsys):
    cfg = parse_config("demo", overrides=["selection.preset=original"])
    assert cfg.preset == "original" and cfg.select.scoring.prompt_gain_weight == 0.0
    assert "'selection.preset' is deprecated; use 'preset'" in capsys.readouterr().err
    # `selection` is no longer a pipeline section: its other keys are refused, naming the stage's key
    with pytest.raises(ConfigError, match="unknown config key 'selection'"):
        parse_config("pipeline", overrides=["selection.method=random"])


def test_selection_preset_errors_name_the_missing_key_and_the_choices():
    with pytest.raises(
        ConfigError,
        match=r"unknown preset; available: \['calibrated', 'filtered_random', 'gates_expert_effect', 'gates_perplexity', 'gates_prompt_gain', 'less_targets', 'original', 'reference', 'similarity'\]",
    ):
        parse_config("pipeline", overrides=["preset=best"])
    cfg = parse_config("pipeline", overrides=["preset=reference"])
    with pytest.raises(ConfigError, match="preset=reference needs pretrain.training.reference_data"):
        check_preset_inputs(cfg)

"""Every accepted key does something: each config key is read by the code, refused when out of
range, or refused where the pipeline sets it itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selectmoe.cli import main
from selectmoe.config import STAGE_CONFIGS, ConfigError, all_keys, parse_config

PACKAGE = Path(__file__).resolve().parents[1] / "selectmoe"
CODE = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p != PACKAGE / "config" / "schema.py")


@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_every_key_is_read_by_the_code(command):
    """A key's last name must be read outside the schema: as an attribute (``cfg.a.key``) or
    an item (``section["key"]``, after ``to_dict``). A key nobody reads would be a silent no-op."""
    unread = [
        key
        for key in all_keys(STAGE_CONFIGS[command])
        if not re.search(rf"\.{key.rsplit('.', 1)[-1]}\b|[\"']{key.rsplit('.', 1)[-1]}[\"']", CODE)
    ]
    assert not unread, f"{command}: keys nothing reads: {unread}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("selection_percentage=-0.1", r"selection_percentage=-0.1 is out of range: expected \(0, 1\]"),
        ("selection_percentage=1.5", r"selection_percentage=1.5 is out of range: expected \(0, 1\]"),
        ("data_process.batch_size=-1", r"data_process.batch_size=-1 is out of range: expected >= 0"),
        ("dataset.subset_ratio=0", r"dataset.subset_ratio=0.0 is out of range"),
        ("training.max_steps=0", None),  # pretrain: -1 (off) or >= 1
        ("clustering_method=hdbscan", r"clustering_method='hdbscan': expected one of \['kmeans'\]"),
        ("scoring.tokens=some", r"scoring.tokens='some': expected one of \['assistant', 'all'\]"),
        ("selection.method=per_dataset", r"'per_dataset': expected one of .* set selection.balance=dataset"),
        ("training.reference_holdout=1", r"training.reference_holdout=1.0 is out of range"),
    ],
)
def test_out_of_range_values_fail_at_parse_time_naming_key_value_and_range(override, message):
    command = "pretrain" if override.startswith("training.") else "select"
    with pytest.raises(ConfigError, match=message or re.escape(override.split("=")[0])):
        parse_config(command, overrides=[override])


def test_keys_the_pipeline_sets_itself_are_refused():
    with pytest.raises(ConfigError, match=r"select.output_dir: the pipeline sets it .*stage_2_select"):
        parse_config("pipeline", overrides=["select.output_dir=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match="select.model_checkpoint_path: the pipeline sets it"):
        parse_config("demo", overrides=["select.model_checkpoint_path=/tmp/stage1"])


def test_tag_names_the_run_folder():
    assert parse_config("select", overrides=["output_dir=outputs/r1", "tag=lr1e-2"]).output_dir == (
        "outputs/r1-lr1e-2"
    )
    assert parse_config("select", overrides=["output_dir=outputs/r1"]).output_dir == "outputs/r1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["select", "selection_percentage=2"], "selection_percentage=2.0 is out of range"),
        (
            ["select", "dataset.data_path=/nonexistent/rows.jsonl", "selector_model.path={model}"],
            "no such file",
        ),
        (
            ["select", "selector_model.path=/nonexistent/model"],
            "selector_model.path=/nonexistent/model: no such",
        ),
        (["finetune", "model.name={empty}", "dataset.data_path=x.jsonl"], "not a model folder"),
        (
            ["select", "selection.method=diversity", "scoring.store_routing=true"]
            + ["clustering_params.auto_k=true", "clustering_params.k_range=[40,10]"],
            "clustering_params.k_range=[40, 10]: expected [lowest, highest]",
        ),
        (
            ["select", "selector_model.path={model}", "scoring.prompt_gain_cap=median"],
            "scoring.prompt_gain_cap=median needs scoring.prompt_gain_weight != 0",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, expected, tiny_olmoe, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(model=tiny_olmoe, empty=empty) for a in args]
    assert main([*args, f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert main([*args, f"output_dir={tmp_path / 'out'}", "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err

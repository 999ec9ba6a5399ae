"""Configs: the schema (one dataclass per command), the loader engine, the shipped YAMLs and presets.

``parse_config`` is the one way a command's config is made: the shipped YAML (or ``--config``),
then the ``key=value`` overrides, then (pipeline, demo, sweep) the preset underneath.
"""

from __future__ import annotations

from typing import Any

from selectmoe.config.loader import (
    ConfigError,
    all_keys,
    build,
    deep_merge,
    load_yaml,
    parse_overrides,
    rename_keys,
    save_config,
    to_dict,
)
from selectmoe.config.presets import check_preset_inputs, load_preset, preset_names, shipped_yaml
from selectmoe.config.schema import (
    DEFAULT_YAML,
    PIPELINE_WIRED,
    RENAMED_KEYS,
    STAGE_CONFIGS,
    ClusteringParams,
    CommonConfig,
    ConvertConfig,
    DataConfig,
    DataProcessSection,
    DatasetConfig,
    DemoConfig,
    DemoSection,
    EvalSection,
    EvaluateConfig,
    FinetuneConfig,
    FinetuneTraining,
    LoraSection,
    PipelineConfig,
    PipelineSection,
    PretrainConfig,
    PretrainTraining,
    QualityLossParams,
    ScalingSection,
    ScoringSection,
    SelectConfig,
    SelectionSection,
    SelectorModelConfig,
    SweepConfig,
    SweepSection,
    TargetModelConfig,
    ValidateDataConfig,
)


def parse_config(command: str, config_file: str | None = None, overrides: list[str] | None = None):
    """The one config loader: shipped YAML (or ``config_file``) + dotted overrides -> typed config."""
    if command not in STAGE_CONFIGS:
        raise ConfigError(f"unknown command {command!r}; expected one of {sorted(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[command]
    data: dict[str, Any] = {}
    if config_file:
        data = load_yaml(config_file)
    elif command in DEFAULT_YAML:
        data = load_yaml(shipped_yaml(DEFAULT_YAML[command]))
    data = rename_keys(deep_merge(data, parse_overrides(overrides or [])), RENAMED_KEYS)
    if issubclass(cls, PipelineConfig):
        _refuse_wired_keys(data)
        name = data.get("preset") or PipelineConfig.preset
        data = deep_merge(load_preset(name)["keys"], data)
    cfg = build(cls, data)
    if cfg.tag:  # the seed's run tag: names the run folder
        cfg.output_dir = f"{cfg.output_dir.rstrip('/')}-{cfg.tag}"
    return cfg


def _refuse_wired_keys(data: dict[str, Any]) -> None:
    """A pipeline sets each stage's output folder, seed and inputs itself; the same keys given per
    stage would be silently replaced, so they are refused."""
    for dotted, instead in PIPELINE_WIRED.items():
        stage, *rest = dotted.split(".")
        value = data.get(stage)
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            raise ConfigError(f"{dotted}: the pipeline sets it ({instead}); remove the key")


__all__ = [
    "ClusteringParams",
    "CommonConfig",
    "ConfigError",
    "ConvertConfig",
    "DEFAULT_YAML",
    "DataConfig",
    "DataProcessSection",
    "DatasetConfig",
    "DemoConfig",
    "DemoSection",
    "EvalSection",
    "EvaluateConfig",
    "FinetuneConfig",
    "FinetuneTraining",
    "LoraSection",
    "PipelineConfig",
    "PipelineSection",
    "PretrainConfig",
    "PretrainTraining",
    "QualityLossParams",
    "RENAMED_KEYS",
    "STAGE_CONFIGS",
    "ScalingSection",
    "ScoringSection",
    "SelectConfig",
    "SelectionSection",
    "SelectorModelConfig",
    "SweepConfig",
    "SweepSection",
    "TargetModelConfig",
    "ValidateDataConfig",
    "all_keys",
    "build",
    "check_preset_inputs",
    "deep_merge",
    "load_preset",
    "load_yaml",
    "parse_config",
    "parse_overrides",
    "preset_names",
    "rename_keys",
    "save_config",
    "shipped_yaml",
    "to_dict",
]

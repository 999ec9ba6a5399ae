"""Typed stage configs: YAML merged with dotted ``key=value`` overrides.

One loader serves every stage (``parse_config``). Each stage has a dataclass whose fields are the
accepted keys; unknown keys fail at once naming the nearest valid key, and values are checked
against the field types. Key names follow the seed project (``training.quality_loss_weight``,
``dataset.data_path``, ``selection_percentage``, ...) so its commands carry over.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


# ---------------------------------------------------------------------------- sections


@dataclass
class SelectorModelConfig:
    """The OLMoE / Select-MoE base used by stages 1-2 (hub id or local folder)."""

    path: str = "allenai/OLMoE-1B-7B-0125"
    tokenizer_name: str | None = None  # defaults to `path`
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class TargetModelConfig:
    """The model finetuned in stage 3 and evaluated in stage 4."""

    name: str = "meta-llama/Llama-2-7b-hf"
    tokenizer_name: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    """Where the instruction rows come from (seed keys)."""

    data_path: list[str] | None = None  # files, folders, globs or URIs
    data_dir: str | None = None  # with dataset_names: one folder per source dataset
    dataset_names: list[str] | None = None
    subset_ratio: float = 1.0  # fraction sampled per source dataset (seeded)
    max_sequence_length: int = 2048


@dataclass
class DataConfig:
    """How rows are validated and tokenised."""

    on_bad_row: str = "skip"  # skip -> rejects.jsonl; error -> stop naming file and line
    loss_on: str = "assistant"  # assistant | all: which tokens carry the LM loss
    read_parallelism: int = -1  # Ray Data read tasks; -1 = let Ray decide


@dataclass
class ScalingSection:
    """Ray workers and their resources. 0 / empty = sized from the cluster's free resources."""

    num_workers: int = 0
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    resources_per_worker: dict[str, float] | None = None
    strategy: str = "ddp"  # ddp | fsdp
    max_failures: int = 1

    def __post_init__(self):
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"scaling.strategy must be ddp or fsdp, got {self.strategy!r}")


@dataclass
class LoraSection:
    r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None = the stage's default targets


@dataclass
class QualityLossParams:
    """Parameters of the quality losses (seed: ``training.quality_loss_params.*``)."""

    beta_target_mean: float = 0.5
    beta_target_var: float = 0.05
    w_mean: float = 1.0
    w_var: float = 1.0
    lambda_var: float = 0.1
    sample_wise_averaging: bool = False


@dataclass
class PretrainTraining:
    """Stage 1 optimisation; defaults are the seed's."""

    peft_mode: str = "full_rank"  # full_rank | lora
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    batch_size: int = 16  # global batch (rows per optimiser step)
    per_device_batch_size: int = 1
    epochs: int = 4
    max_steps: int = -1  # > 0 stops early (debug runs, sweeps)
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = True
    # seed: r=16, alpha=64; dropout 0 because PEFT's LoRA on a bare parameter (the router) has none
    lora: LoraSection = field(default_factory=lambda: LoraSection(r=16, lora_alpha=64, lora_dropout=0.0))
    quality_loss_weight: float = 0.01
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = 0.02
    trash_expert_mode: str = "zero"
    enable_load_balancing: bool = False
    quality_loss_type: str = "sigmoid"
    quality_loss_debug: bool = False
    quality_loss_tokens: str = "all"  # all | assistant
    quality_loss_params: QualityLossParams = field(default_factory=QualityLossParams)
    router_aux_loss_coef: float = 0.01
    checkpoint_every_steps: int = 50
    log_every_steps: int = 1
    fail_at_step: int = -1  # fault injection: raise once at this step (tests recovery)
    probe_labels: str | None = None  # labels.jsonl ({"id", "defect"}): report probe_auroc while training
    probe_rows: int = 256  # labelled rows not trained on, scored every probe_every_steps
    probe_every_steps: int = 5
    # trusted rows (files/folders/globs, any supported format): stage 1 trains the row score (the
    # stage-2 formula) to tell them from corpus rows, open on reference rows and shut on the corpus on
    # average (class-balanced BCE); None = the original unsupervised recipe
    reference_data: list[str] | None = None
    reference_loss_weight: float = 1.0


@dataclass
class FinetuneTraining:
    """Stage 3 optimisation; defaults are LESS's."""

    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 128  # effective batch = per_device x accumulation x workers
    per_device_batch_size: int = 1
    epochs: int = 4
    max_steps: int = -1
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = True
    lora: LoraSection = field(
        default_factory=lambda: LoraSection(
            r=128, lora_alpha=512, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    )
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch (always checkpointed)
    log_every_steps: int = 1
    fail_at_step: int = -1  # fault injection: raise once at this step (tests recovery)


@dataclass
class ClusteringParams:
    """Seed keys for the diversity selection."""

    k: int = 26
    auto_k: bool = False
    k_range: list[int] = field(default_factory=lambda: [10, 40])
    max_iters: int = 300


@dataclass
class DataProcessSection:
    batch_size: int = 32  # rows per scoring batch (upper bound; tokens_per_batch also caps it)


@dataclass
class ScoringSection:
    tokens: str = "assistant"  # assistant | all: which tokens a row's score averages over
    tokens_per_batch: int = 16384  # cap on padded tokens in one scoring batch
    sort_window: int = 1024  # rows sorted by length together before batching
    store_routing: bool = False  # keep per-layer mean routing distributions (diversity selection)
    lm_loss: bool = False  # also store each row's mean NLL over its scored tokens (perplexity baseline)
    perplexity_weight: float = 0.0  # score = mean gate - this x mean NLL (same pass; > 0 implies lm_loss)
    prompt_gain: bool = False  # also store nll_without_prompt: the replies' NLL with the prompts removed
    prompt_gain_weight: float = 0.0  # score += this x (nll_without_prompt - NLL) (!= 0 implies prompt_gain)
    expert_effect: bool = False  # also store nll_gates_shut: the NLL with every quality gate forced to 0
    expert_effect_weight: float = 0.0  # score += this x (nll_gates_shut - NLL) (!= 0 implies expert_effect)
    num_actors: int = 0  # 0 = one per GPU, or sized from free CPUs
    inject_actor_failure: bool = False  # fault injection: one scoring actor exits once (tests recovery)


@dataclass
class SelectionSection:
    method: str = "top_k"  # top_k | per_dataset | diversity | random | threshold
    count: int = 0  # > 0 overrides selection_percentage
    threshold: float | None = None
    quotas: dict[str, float] | None = None  # per_dataset: fraction or count per dataset
    exclude_training_rows: bool = True


@dataclass
class EvalSection:
    adapter: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["less"])
    data_dir: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: str = "auto"  # auto = lm-eval's search on GPU, 4 on CPU; or an integer
    max_gen_toks: int | None = None  # cap on generated tokens for generation tasks; None = each task's own
    apply_chat_template: bool = False


# ---------------------------------------------------------------------------- stage configs


@dataclass
class CommonConfig:
    seed: int = 42
    output_dir: str = "outputs/run"
    tag: str | None = None


@dataclass
class ValidateDataConfig(CommonConfig):
    output_dir: str = "outputs/validate"
    tokenizer_name: str | None = None  # for token-length percentiles; none = skip
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class PretrainConfig(CommonConfig):
    output_dir: str = "outputs/stage_1_pretrain"
    selector_model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(subset_ratio=0.05))
    data: DataConfig = field(default_factory=DataConfig)
    training: PretrainTraining = field(default_factory=PretrainTraining)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class SelectConfig(CommonConfig):
    output_dir: str = "outputs/stage_2_selection"
    selector_model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    model_checkpoint_path: str | None = None
    selection_percentage: float = 0.05
    clustering_method: str = "kmeans"
    clustering_params: ClusteringParams = field(default_factory=ClusteringParams)
    data_process: DataProcessSection = field(default_factory=DataProcessSection)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class FinetuneConfig(CommonConfig):
    output_dir: str = "outputs/stage_3_finetune"
    model: TargetModelConfig = field(default_factory=TargetModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: FinetuneTraining = field(default_factory=FinetuneTraining)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class EvaluateConfig(CommonConfig):
    output_dir: str = "outputs/stage_4_eval"
    model: TargetModelConfig = field(default_factory=TargetModelConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class ConvertConfig(CommonConfig):
    output_dir: str = "outputs/select_moe_converted"
    olmoe: str = "allenai/OLMoE-1B-7B-0125"
    verify: bool = False
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = 0.02


@dataclass
class PipelineSection:
    stages: list[str] = field(default_factory=lambda: ["pretrain", "select", "finetune", "evaluate"])
    baselines: list[str] = field(default_factory=list)  # random | full: finetuned and evaluated the same way


@dataclass
class SelectionPreset:
    # a named recipe in selectmoe/configs/presets/NAME.yaml: its keys go under the shipped YAML's, your
    # config file's and your overrides (which win)
    preset: str = "gates_prompt_gain"


@dataclass
class PipelineConfig(CommonConfig):
    """Stages 1-4 in one run folder. ``dataset`` is the corpus for stages 1 and 2 (a stage's own
    ``dataset.data_path``/``data_dir`` wins when set); stage 3 reads stage 2's selection and stage 4
    evaluates stage 3's adapter on ``finetune.model.name``."""

    output_dir: str = "outputs/pipeline"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    selection: SelectionPreset = field(default_factory=SelectionPreset)


@dataclass
class DemoSection:
    rows: int = 2000  # generated training rows
    defect_rate: float = 0.3  # share of rows with a planted defect
    lm_steps: int = 100  # LM pretraining steps of the tiny demo models (cached)
    cache_dir: str | None = None  # default ~/.cache/selectmoe/demo_models


@dataclass
class DemoConfig(PipelineConfig):
    """The pipeline on generated data and tiny offline models (see selectmoe/configs/demo.yaml)."""

    output_dir: str = "outputs/demo"
    demo: DemoSection = field(default_factory=DemoSection)


@dataclass
class SweepSection:
    space: str = "tune_spaces/quality_loss.yaml"  # search space YAML (pretrain keys -> samplers)
    num_samples: int = 8
    max_concurrent_trials: int = 0  # 0 = from free resources
    metric: str = "auto"  # auto = probe_auroc (max) with probe_labels, else lm_loss (min)
    mode: str = "min"  # used when metric is set explicitly
    grace_period: int = 5  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: int = 2
    handoff_top_k: int = 1  # best trials sent through stages 2-4
    probe_labels: str | None = None  # labels.jsonl ({"id", "defect"}) of corpus rows: the AUROC proxy


@dataclass
class SweepConfig(PipelineConfig):
    """A pipeline config (the base every trial starts from) plus the search."""

    output_dir: str = "outputs/sweep"
    sweep: SweepSection = field(default_factory=SweepSection)


STAGE_CONFIGS: dict[str, type] = {
    "validate-data": ValidateDataConfig,
    "pretrain": PretrainConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "convert": ConvertConfig,
    "pipeline": PipelineConfig,
    "demo": DemoConfig,
    "sweep": SweepConfig,
}

# The shipped YAML each command starts from (package data in selectmoe/configs/).
DEFAULT_YAML: dict[str, str] = {
    "validate-data": "validate_data.yaml",
    "pretrain": "stage_1_pretrain.yaml",
    "select": "stage_2_selection.yaml",
    "finetune": "stage_3_finetune.yaml",
    "evaluate": "stage_4_evaluate.yaml",
    "pipeline": "pipeline.yaml",
    "demo": "demo.yaml",
    "sweep": "sweep.yaml",
}


# ---------------------------------------------------------------------------- parsing


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict. Values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        _set_dotted(nested, key.split("."), value)
    return nested


def _set_dotted(target: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        existing = target.get(part)
        if not isinstance(existing, dict):
            existing = {}
            target[part] = existing
        target = existing
    target[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def shipped_yaml(name: str) -> Path:
    return Path(str(resources.files("selectmoe") / "configs" / name))


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (sections expanded)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def build(cls: type, data: dict[str, Any], prefix: str = ""):
    """Construct ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, prefix, key))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            # merge onto the field's default instance so section defaults (e.g. LoRA targets) survive
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            kwargs[f.name] = build(tp, deep_merge(to_dict(default), value or {}), f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def _unknown_key_message(cls: type, prefix: str, key: str) -> str:
    full = f"{prefix}{key}"
    here = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]  # sections and keys at this level
    candidates = all_keys(cls, prefix)
    nearest = difflib.get_close_matches(full, here, n=1, cutoff=0.6) or difflib.get_close_matches(
        full, candidates, n=1, cutoff=0.5
    )
    if not nearest:  # a misspelt section: compare the last part only
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.5)
        nearest = [by_leaf[leaf[0]]] if leaf else []
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return f"unknown config key '{full}'{hint}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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
    data = deep_merge(data, parse_overrides(overrides or []))
    if issubclass(cls, PipelineConfig):
        name = (data.get("selection") or {}).get("preset") or SelectionPreset.preset
        data = deep_merge(load_preset(name)["keys"], data)
    return build(cls, data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in shipped_yaml("presets").glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """``{"keys": nested pipeline keys, "requires": [dotted keys that must be set]}``."""
    if name not in preset_names():
        raise ConfigError(f"selection.preset={name!r}: unknown preset; available: {preset_names()}")
    data = load_yaml(shipped_yaml("presets") / f"{name}.yaml")
    requires = data.pop("requires", [])
    return {"keys": data, "requires": requires}


def check_preset_inputs(cfg: Any) -> None:
    """Raise unless the keys the preset needs are set (checked when a run starts: the demo fills its
    own reference set in after parsing)."""
    name = cfg.selection.preset
    for dotted in load_preset(name)["requires"]:
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if value in (None, "", []):
            raise ConfigError(
                f"selection.preset={name} needs {dotted} (see selectmoe/configs/presets/{name}.yaml); "
                f"or choose another preset: {[p for p in preset_names() if p != name]}"
            )


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

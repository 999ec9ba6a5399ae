"""The config schema: one dataclass per command, built from shared sections.

A dataclass's fields are the keys a command accepts (``loader.build`` rejects any other). Key names
follow the seed project (``training.quality_loss_weight``, ``dataset.data_path``,
``selection_percentage``, ...) so its commands carry over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selectmoe.config.loader import Between, OneOf, one_of, ranged
from selectmoe.layout import SELECTED_JSONL, STAGE_DIRS


def after_scoring(default: float, **bounds):
    """A scoring key that says how the stored terms combine into the row score, not what is computed:
    outside the resume key (``select.score.scores_depend_on``), so changing it reuses the score files
    and the selection recomputes every row's score from their terms."""
    metadata = {"after_scoring": True, **({"allowed": Between(**bounds)} if bounds else {})}
    return field(default=default, metadata=metadata)


def pass_switch():
    """A scoring key that turns a pass on (or a stored column): in the resume key only through the
    ``ScorePasses`` it implies, which the weights can imply as well."""
    return field(default=False, metadata={"pass_switch": True})


DTYPES = ("auto", "float32", "bfloat16", "float16")
SELECTION_METHODS = (
    "top_k",
    "diversity",
    "random",
    "filtered_random",
    "threshold",
    "similarity",
    "calibrated",
)


# ---------------------------------------------------------------------------- sections


@dataclass
class SelectorModelConfig:
    """The OLMoE / Select-MoE base used by stages 1-2 (hub id or local folder)."""

    path: str = "allenai/OLMoE-1B-7B-0125"
    tokenizer_name: str | None = None  # defaults to `path`
    dtype: str = one_of("auto", DTYPES)  # auto = bf16 on GPU, fp32 on CPU
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class TargetModelConfig:
    """The model finetuned in stage 3 and evaluated in stage 4."""

    name: str = "meta-llama/Llama-2-7b-hf"
    tokenizer_name: str | None = None
    dtype: str = one_of("auto", DTYPES)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    """Where the instruction rows come from (seed keys)."""

    data_path: list[str] | None = None  # files, folders, globs or URIs
    data_dir: str | None = None  # with dataset_names: one folder per source dataset
    dataset_names: list[str] | None = None
    subset_ratio: float = ranged(1.0, low=0, high=1, low_open=True)  # fraction sampled per source dataset
    max_sequence_length: int = ranged(2048, low=2)


@dataclass
class DataConfig:
    """How rows are validated and tokenised."""

    on_bad_row: str = one_of(
        "skip", ("skip", "error")
    )  # skip -> rejects.jsonl; error -> stop naming file and line
    loss_on: str = one_of("assistant", ("assistant", "all"))  # which tokens carry the LM loss
    read_parallelism: int = ranged(-1, low=1, also=(-1,))  # Ray Data read tasks; -1 = let Ray decide
    # files above this are read in pieces by parallel tasks (JSON lines byte ranges, Parquet row
    # groups), smaller pieces when that gives each CPU two; 0 = one task per file
    split_bytes: int = ranged(128 << 20, low=0)


@dataclass
class ScalingSection:
    """Ray workers and their resources. 0 / empty = sized from the cluster's free resources."""

    num_workers: int = ranged(0, low=0)
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    resources_per_worker: dict[str, float] | None = None
    strategy: str = one_of("ddp", ("ddp", "fsdp"))
    max_failures: int = ranged(1, low=0, also=(-1,))  # -1 = retry forever (Ray Train's FailureConfig)


@dataclass
class LoraSection:
    r: int = ranged(16, low=1)
    lora_alpha: int = ranged(64, low=1)
    lora_dropout: float = ranged(0.05, low=0, high=1, high_open=True)
    target_modules: list[str] | None = None  # None = the stage's default targets


@dataclass
class QualityLossParams:
    """Parameters of the quality losses (seed: ``training.quality_loss_params.*``)."""

    beta_target_mean: float = ranged(0.5, low=0, high=1)
    beta_target_var: float = ranged(0.05, low=0)
    w_mean: float = ranged(1.0, low=0)
    w_var: float = ranged(1.0, low=0)
    lambda_var: float = ranged(0.1, low=0)
    sample_wise_averaging: bool = False


@dataclass
class PretrainTraining:
    """Stage 1 optimisation; defaults are the seed's."""

    peft_mode: str = one_of("full_rank", ("full_rank", "lora"))
    learning_rate: float = ranged(3e-4, low=0, low_open=True)
    weight_decay: float = ranged(0.0, low=0)
    warmup_ratio: float = ranged(0.0, low=0, high=1, high_open=True)
    batch_size: int = ranged(16, low=1)  # global batch (rows per optimiser step)
    per_device_batch_size: int = ranged(1, low=1)
    epochs: int = ranged(4, low=1)
    max_steps: int = ranged(-1, low=1, also=(-1,))  # > 0 stops early (debug runs, sweeps)
    gradient_clipping: float = ranged(1.0, low=0)  # max gradient norm; 0 = off
    gradient_checkpointing: bool = True
    # seed: r=16, alpha=64; dropout 0 because PEFT's LoRA on a bare parameter (the router) has none
    lora: LoraSection = field(default_factory=lambda: LoraSection(r=16, lora_alpha=64, lora_dropout=0.0))
    quality_loss_weight: float = ranged(0.01, low=0)
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = ranged(0.02, low=0)
    trash_expert_mode: str = one_of("zero", ("zero", "noise", "custom"))
    enable_load_balancing: bool = False
    quality_loss_type: str = "sigmoid"
    quality_loss_debug: bool = False
    quality_loss_tokens: str = one_of("all", ("all", "assistant"))
    quality_loss_params: QualityLossParams = field(default_factory=QualityLossParams)
    router_aux_loss_coef: float = ranged(0.01, low=0)
    checkpoint_every_steps: int = ranged(50, low=0)
    log_every_steps: int = ranged(1, low=1)
    fail_at_step: int = ranged(-1, low=1, also=(-1,))  # fault injection: raise once at this step
    probe_labels: str | None = None  # labels.jsonl ({"id", "defect"}): report probe_auroc while training
    probe_rows: int = ranged(256, low=1)  # labelled rows not trained on, scored every probe_every_steps
    probe_every_steps: int = ranged(5, low=0)
    # trusted rows (files/folders/globs, any supported format): stage 1 trains the row score (the
    # stage-2 formula) to tell them from corpus rows, open on reference rows and shut on the corpus on
    # average (class-balanced BCE); None = the original unsupervised recipe
    reference_data: list[str] | None = None
    reference_loss_weight: float = ranged(1.0, low=0)
    # a seeded share of the reference rows kept out of training: scored with corpus rows stage 1 did not
    # train on (probe_rows of them) every probe_every_steps, the gates' direction on unseen trusted rows
    reference_holdout: float = ranged(0.2, low=0, high=1, high_open=True)


@dataclass
class FinetuneTraining:
    """Stage 3 optimisation; defaults are LESS's."""

    learning_rate: float = ranged(2e-5, low=0, low_open=True)
    weight_decay: float = ranged(0.0, low=0)
    warmup_ratio: float = ranged(0.03, low=0, high=1, high_open=True)
    batch_size: int = ranged(128, low=1)  # effective batch = per_device x accumulation x workers
    per_device_batch_size: int = ranged(1, low=1)
    epochs: int = ranged(4, low=1)
    max_steps: int = ranged(-1, low=1, also=(-1,))
    gradient_clipping: float = ranged(1.0, low=0)  # max gradient norm; 0 = off
    gradient_checkpointing: bool = True
    lora: LoraSection = field(
        default_factory=lambda: LoraSection(
            r=128, lora_alpha=512, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    )
    checkpoint_every_steps: int = ranged(0, low=0)  # 0 = only at the end of each epoch (always checkpointed)
    log_every_steps: int = ranged(1, low=1)
    fail_at_step: int = ranged(-1, low=1, also=(-1,))  # fault injection: raise once at this step


@dataclass
class ClusteringParams:
    """Seed keys for the diversity selection."""

    k: int = ranged(26, low=1)
    auto_k: bool = False  # choose k in k_range by the silhouette of the routing features (seeded)
    k_range: list[int] = field(default_factory=lambda: [10, 40])  # [lowest, highest] k tried
    max_iters: int = ranged(300, low=1)


@dataclass
class DataProcessSection:
    # rows per scoring sub-batch, at most (scoring.tokens_per_batch caps it too); 0 = 128 on a GPU, where
    # short rows need more than 32 to fill one, and the seed's 32 on CPU
    batch_size: int = ranged(0, low=0)


@dataclass
class ScoringSection:
    tokens: str = one_of("assistant", ("assistant", "all"))  # which tokens a row's score averages over
    # cap on padded tokens in one scoring batch; 0 = 16384 on a GPU, 4096 on CPU (at OLMoE-1B-7B's shape
    # a 16k-token batch held ~6 GiB of activations beside the 13 GiB of weights: too much for 24 GB)
    tokens_per_batch: int = field(default=0, metadata={"execution": True, "allowed": Between(low=0)})
    # rows sorted by length together before batching
    sort_window: int = field(default=1024, metadata={"execution": True, "allowed": Between(low=1)})
    store_routing: bool = pass_switch()  # keep per-layer mean routing distributions (diversity selection)
    # keep each row's position-weighted mean of the last hidden state, fp16 (similarity selection)
    store_embeddings: bool = pass_switch()
    # the mean gate's weight in the row score; 0 = the gates are still scored, stored and reported but
    # do not rank rows (the default: they ranked defective rows higher in every measured run)
    gate_weight: float = after_scoring(1.0)
    # also store each row's mean NLL over its scored tokens (perplexity baseline)
    lm_loss: bool = pass_switch()
    # score = mean gate - this x mean NLL (same pass; != 0 implies lm_loss). Every weight below is applied
    # when selecting (``after_scoring``): changing one reuses the score files unless it turns a pass on
    perplexity_weight: float = after_scoring(0.0)
    # also store nll_without_prompt: the replies' NLL with the prompts removed
    prompt_gain: bool = pass_switch()
    # score += this x (nll_without_prompt - NLL) (!= 0 implies prompt_gain)
    prompt_gain_weight: float = after_scoring(0.0)
    # the model the NLLs (NLL, prompt gain, expert effect) are measured with: stage1, the quality-gated
    # model stage 1 trained; base, the model stage 1 started from (the base's routers swapped back in,
    # every quality gate open), whose NLL training the gates has not perturbed: one more pass over the
    # full rows when the gates are scored too. The gates and D2 always come from the stage-1 model.
    nll_model: str = one_of("stage1", ("stage1", "base"))
    # also store nll_gates_shut: the NLL with every quality gate forced to 0
    expert_effect: bool = pass_switch()
    # score += this x (nll_gates_shut - NLL) (!= 0 implies expert_effect)
    expert_effect_weight: float = after_scoring(0.0)
    # also store gate_slope, gate_curvature and driving_force (D2) per layer: derivatives of the row's NLL
    # with respect to its gates (one forward, a double backward per layer; selectmoe.select.score)
    driving_force: bool = pass_switch()
    # score += this x mean over layers of D2 (!= 0 implies driving_force)
    driving_force_weight: float = after_scoring(0.0)
    # score -= this x max(reply_redundancy - redundancy_tolerance, 0); reply_redundancy, always stored, is
    # the larger of the share of the reply's token 4-grams already earlier in the reply (it repeats itself)
    # and the share of the request's 4-grams the reply repeats (it restates its request): a share in
    # [0, 1] on any model and corpus, so never z-scored
    redundancy_weight: float = after_scoring(0.0)
    # the share a reply may repeat unpenalised: a chain of thought restates its question's facts
    redundancy_tolerance: float = after_scoring(0.0, low=0.0, high=1.0)
    # score -= this x max(reply_commonness - commonness_tolerance, 0); reply_commonness is the share of the
    # reply's token 8-grams that at least common_ngram_share of the corpus's replies hold (measured on a
    # seeded sample of the score files from the reply_ngrams column, always stored): text many rows share,
    # a canned reply, a disclaimer, a closing formula. A share in [0, 1], never z-scored
    commonness_weight: float = after_scoring(0.0)
    # the share of shared text a reply may hold unpenalised: a dataset's own answer template is shared too
    commonness_tolerance: float = after_scoring(0.0, low=0.0, high=1.0)
    # an 8-gram is common when at least this share of the sampled replies hold it (and 3 of them)
    common_ngram_share: float = after_scoring(0.001, low=0.0, high=1.0)
    # raw: the weights multiply the terms as measured; robust_z: each term is first centred on its
    # median over the scored corpus and divided by its IQR / 1.349 (a seeded sample of the score files,
    # no rescoring), so that a weight means the same on any model and corpus. Applied when selecting:
    # the score files keep the raw terms, so changing it reuses them.
    combine: str = field(
        default="raw", metadata={"after_scoring": True, "allowed": OneOf(("raw", "robust_z"))}
    )
    # median: the prompt gain counts only up to its median over the scored corpus (measured on the same
    # seeded sample as robust_z's scales): min(prompt gain, median). A reply its prompt explains less
    # than the typical row's loses score; one it explains more gains none, since the per-token gain is
    # highest on a reply's first tokens and so rewards short and cut-off replies. lower_quartile: the
    # same up to its 25th percentile (only the quarter of rows their prompt explains least lose score).
    # Applied when selecting.
    prompt_gain_cap: str = field(
        default="none",
        metadata={"after_scoring": True, "allowed": OneOf(("none", "median", "lower_quartile"))},
    )
    # how the pass runs, not what it computes: not part of the resume key (``scores_depend_on``)
    # 0 = one per GPU, or from free CPUs and memory (select.driver.cpu_pool_size)
    num_actors: int = field(default=0, metadata={"execution": True, "allowed": Between(low=0)})
    # fault injection: one scoring actor exits once (tests recovery)
    inject_actor_failure: bool = field(default=False, metadata={"execution": True})


@dataclass
class SelectionSection:
    method: str = one_of(
        "top_k", SELECTION_METHODS, hint="to keep the corpus's mix per dataset, set selection.balance=dataset"
    )
    count: int = ranged(0, low=0)  # > 0 overrides selection_percentage
    threshold: float | None = None
    # dataset: the selection keeps the corpus's mix, each source dataset its share of the k rows (largest
    # remainder) or its selection.quotas, the method's own order inside it (top_k, calibrated, random,
    # filtered_random); none: one order over the whole corpus; auto: dataset for filtered_random, else none
    balance: str = one_of("auto", ("auto", "none", "dataset"))
    # balance=dataset: {dataset: fraction (< 1) or row count}; replaces selection_percentage / count, and a
    # dataset it does not name gets no rows
    quotas: dict[str, float] | None = None
    # filtered_random: the share of each dataset (its best-scored rows) the random draw is made from
    keep_fraction: float = ranged(0.5, low=0, high=1, low_open=True)
    # filtered_random: what each threshold and quota is per: each dataset (dataset), or each dataset's
    # frequent replies apart (reply: a reply 5 or more and 1% of the dataset's sampled rows give, such as
    # an answer label, is a stratum of its own, the dataset's other rows one more): a likelihood filter
    # otherwise keeps the answers the selector finds likely and drops the rarer ones; auto: reply for
    # filtered_random without selection.quotas (which are per dataset), else dataset
    strata: str = one_of("auto", ("auto", "dataset", "reply"))
    # similarity: files (or folders) of target-task examples, any supported row format; a row's task is
    # its ``task`` field, else its dataset (the file's stem)
    targets: list[str] | None = None
    # similarity: a folder of evaluation sets in eval.data_dir's layout; the shots LESS took as target
    # examples are added to the targets (MMLU's 5 dev questions per subject, BBH's 3 CoT shots per task,
    # TyDi QA's 1 per language; one task per benchmark)
    target_eval_dir: str | None = None
    # files (or folders) of rows you trust, any supported row format (a few hundred of the target tasks,
    # or clean rows of your sources). calibrated: a logistic regression on the stored features learns to
    # tell them from the corpus, and its log-odds is the row score; top_k / filtered_random with
    # scoring.gate_weight != 0: they set the gate term's sign (select/calibrate.gate_sign)
    trusted: list[str] | None = None
    exclude_training_rows: bool = True


@dataclass
class EvalSection:
    adapter: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["less"])
    data_dir: str | None = None
    limit: float | None = ranged(None, low=0, low_open=True)  # < 1: a fraction of each task; else rows
    num_fewshot: int | None = ranged(None, low=0)
    batch_size: str = "auto"  # auto = lm-eval's search on GPU, 4 on CPU; or an integer
    max_gen_toks: int | None = ranged(
        None, low=1
    )  # cap on generated tokens for generation tasks; None = each task's own
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
    output_dir: str = f"outputs/{STAGE_DIRS['pretrain']}"
    selector_model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(subset_ratio=0.05))
    data: DataConfig = field(default_factory=DataConfig)
    training: PretrainTraining = field(default_factory=PretrainTraining)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class SelectConfig(CommonConfig):
    output_dir: str = f"outputs/{STAGE_DIRS['select']}"
    selector_model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    model_checkpoint_path: str | None = None
    selection_percentage: float = ranged(0.05, low=0, high=1, low_open=True)
    clustering_method: str = one_of("kmeans", ("kmeans",), hint="the diversity selection is cosine k-means")
    clustering_params: ClusteringParams = field(default_factory=ClusteringParams)
    data_process: DataProcessSection = field(default_factory=DataProcessSection)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class FinetuneConfig(CommonConfig):
    output_dir: str = f"outputs/{STAGE_DIRS['finetune']}"
    model: TargetModelConfig = field(default_factory=TargetModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: FinetuneTraining = field(default_factory=FinetuneTraining)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class EvaluateConfig(CommonConfig):
    output_dir: str = f"outputs/{STAGE_DIRS['evaluate']}"
    model: TargetModelConfig = field(default_factory=TargetModelConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)


@dataclass
class ConvertConfig(CommonConfig):
    output_dir: str = "outputs/select_moe_converted"
    olmoe: str = "allenai/OLMoE-1B-7B-0125"
    verify: bool = False
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = ranged(0.02, low=0)


@dataclass
class PipelineSection:
    stages: list[str] = field(default_factory=lambda: ["pretrain", "select", "finetune", "evaluate"])
    baselines: list[str] = field(default_factory=list)  # random | full: finetuned and evaluated the same way


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
    # a named recipe in selectmoe/configs/presets/NAME.yaml: its keys go under the shipped YAML's, your
    # config file's and your overrides (which win); was `selection.preset`
    preset: str = "filtered_random"


@dataclass
class DemoSection:
    rows: int = ranged(2000, low=10)  # generated training rows
    defect_rate: float = ranged(0.3, low=0, high=1, high_open=True)  # share of rows with a planted defect
    # LM pretraining steps of the tiny selector (cached): its regime decides whether the scores work
    # (benchmarks/lm_plateau.py); the target's matters less, and costs as much per step
    lm_steps: int = ranged(2400, low=0)
    target_lm_steps: int = ranged(100, low=0)
    cache_dir: str | None = None  # default ~/.cache/selectmoe/demo_models


@dataclass
class DemoConfig(PipelineConfig):
    """The pipeline on generated data and tiny offline models (see selectmoe/configs/demo.yaml)."""

    output_dir: str = "outputs/demo"
    demo: DemoSection = field(default_factory=DemoSection)


@dataclass
class SweepSection:
    space: str = "tune_spaces/quality_loss.yaml"  # search space YAML (pretrain keys -> samplers)
    num_samples: int = ranged(8, low=1)
    max_concurrent_trials: int = ranged(0, low=0)  # 0 = from free resources
    metric: str = "auto"  # auto = probe_auroc (max) with probe_labels, else lm_loss (min)
    mode: str = one_of("min", ("min", "max"))  # used when metric is set explicitly
    grace_period: int = ranged(5, low=1)  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: int = ranged(2, low=2)
    handoff_top_k: int = ranged(1, low=0)  # best trials sent through stages 2-4
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
    "pretrain": "pretrain.yaml",
    "select": "select.yaml",
    "finetune": "finetune.yaml",
    "evaluate": "evaluate.yaml",
    "pipeline": "pipeline.yaml",
    "demo": "demo.yaml",
    "sweep": "sweep.yaml",
}

# Per-stage keys of a pipeline that the pipeline itself sets (the value says to what).
PIPELINE_WIRED: dict[str, str] = {
    **{f"{stage}.{key}": f"from the run's {key}" for stage in STAGE_DIRS for key in ("seed", "tag")},
    **{f"{stage}.output_dir": f"RUN/{folder}" for stage, folder in STAGE_DIRS.items()},
    "select.model_checkpoint_path": f"RUN/{STAGE_DIRS['pretrain']}",
    "finetune.dataset.data_path": f"RUN/{STAGE_DIRS['select']}/{SELECTED_JSONL}",
    "finetune.dataset.data_dir": f"RUN/{STAGE_DIRS['select']}/{SELECTED_JSONL}",
    "evaluate.eval.adapter": f"RUN/{STAGE_DIRS['finetune']}",
    "evaluate.model.name": "finetune.model.name",
}

# Keys that were renamed: old dotted key -> new one. The loader moves them and prints a deprecation line.
RENAMED_KEYS: dict[str, str] = {"selection.preset": "preset"}

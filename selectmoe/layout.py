"""Every file and folder name a stage writes or reads: the one artifact layout.

    RUN/                                   a pipeline / demo run folder
      stage_1_pretrain/                    selectmoe pretrain
        router_weights.safetensors | adapter/   the trained gates + routers, or the LoRA adapter
        select_moe_config.json  tokenizer/  training_ids.parquet  metrics.jsonl  training_curves.png
        rejects.jsonl  manifest.json  ray_train/
      stage_2_select/                      selectmoe select
        scores/*.parquet (+ _scoring_config.json)  selected.parquet  selected.jsonl
        score_histograms.png  rejects.jsonl  manifest.json
      stage_3_finetune/                    selectmoe finetune: a PEFT adapter folder + tokenizer
        adapter_model.safetensors  metrics.jsonl  training_curves.png  rejects.jsonl  manifest.json
      stage_4_evaluate/                    selectmoe evaluate
        results.json  results.md  manifest.json
      baseline_random/ baseline_full/      the same stage folders for each baseline
      report.md  *.png  logs/

Readers and writers import these names; nothing else spells them.
"""

from __future__ import annotations

from pathlib import Path

# ---- run folders (one name per stage: command, module, ray_jobs entry, config file, folder)
STAGES = ("pretrain", "select", "finetune", "evaluate")
STAGE_DIRS = {
    "pretrain": "stage_1_pretrain",
    "select": "stage_2_select",
    "finetune": "stage_3_finetune",
    "evaluate": "stage_4_evaluate",
}
BASELINE_PREFIX = "baseline_"
PIPELINE_KEY = "pipeline_key.json"  # a finished stage's key inside its folder (pipeline resume)
REPORT = "report.md"
GATE_LAYERS = "gate_layers.png"  # report figures, beside report.md
COMPOSITION = "selection_composition.png"
SEPARATION = "separation.json"  # demo: how the scores separate planted defects
LOGS_DIR = "logs"
# scratch in stages 1-3's output_dir while the command runs: the rows in the subset with their
# tokens, as the scan wrote them (the text is read once); the trusted rows' (selection.trusted,
# training.reference_data) in the second
ROWS_SCRATCH = ".rows"
TRUSTED_ROWS_SCRATCH = ".trusted_rows"
TRAINING_ROWS_SCRATCH = ".training_rows"  # stage 2: where stage 1's training rows sit in the score files

# ---- every stage
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
METRICS = "metrics.jsonl"  # one JSON line per training step (stages 1 and 3)
TRAINING_CURVES = "training_curves.png"
RAY_TRAIN_DIR = "ray_train"  # Ray Train's storage_path inside a training stage's output_dir

# ---- stage 1
ROUTER_WEIGHTS = "router_weights.safetensors"  # full_rank: quality gates + MoE routers
ADAPTER_DIR = "adapter"  # lora (stage 1), and the adapter inside a training checkpoint
STAGE1_CONFIG = "select_moe_config.json"  # names the base model and tokenizer of the trained gates
TRAINING_IDS = "training_ids.parquet"  # the corpus rows stage 1 trained on (stage 2 excludes them)
TOKENIZER_DIR = "tokenizer"
REFERENCE_REJECTS = "reference_rejects.jsonl"

# ---- training checkpoints (stages 1 and 3)
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"

# ---- stage 2
SCORES_DIR = "scores"
SCORING_KEY = "_scoring_config.json"  # inside scores/: what the score files were computed under
SELECTED_JSONL = "selected.jsonl"
SELECTED_PARQUET = "selected.parquet"
SELECTED_PARTS = ".selected_parts"  # scratch: the selected rows in rank-sorted parts, before the merge
SCORE_HISTOGRAMS = "score_histograms.png"
CALIBRATION = "calibration.json"  # selection.method=calibrated: the fitted combiner, its CV AUROC
COMMON_NGRAMS = "common_ngrams.json"  # scoring.commonness_weight: the corpus's common reply n-gram hashes
TRUSTED_REJECTS = "trusted_rejects.jsonl"  # selection.trusted rows that could not be read
EVAL_TARGETS = "eval_targets.jsonl"  # selection.target_eval_dir's few-shot examples as target rows
TARGET_REJECTS = "target_rejects.jsonl"  # selection.targets rows that could not be read
TARGET_EMBEDDINGS = "target_embeddings.parquet"  # selection.targets rows: task, id, embedding

# ---- stage 4
RESULTS = "results.json"
RESULTS_TABLE = "results.md"

# ---- sweep
TUNE_DIR = "tune"  # Ray Tune's storage
ASHA_RUNGS = "asha_rungs.json"  # in TUNE_DIR: ASHA's rung records, which Tune does not save
TRIALS_DIR = "trials"  # one pipeline run folder per trial
TRIAL_OVERRIDES = "overrides.json"  # a trial's sampled values
TRIALS_FILE = "sweep_trials.json"  # the trials with a metric, best first (machine-readable report)
SWEEP_REPORT = "sweep_report.md"

# ---- validate-data
ROWS_DIR = "rows"

# ---- tiny models (demo, benchmarks): their LM pretraining, {"steps", "loss": per-step training loss}
LM_PRETRAINING = "lm_pretraining.json"


def score_files(scores_dir: str | Path) -> list[Path]:
    """The finished score files of a ``scores/`` folder (Ray Data's write leaves no other parquet)."""
    return sorted(p for p in Path(scores_dir).glob("*.parquet") if not p.name.startswith(("_", ".")))

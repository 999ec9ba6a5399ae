"""Stage 2 driver: ``selectmoe select`` / ``python -m ray_jobs.select``.

Ray Data: one scan of the text (Ray tasks: read -> normalise/validate (rejects) -> tokenise with the
shared template), which writes the rows in the subset with their tokens to the scratch folder
``layout.ROWS_SCRATCH`` -> scoring actor pool reading those parts (``GateScorer``: windows sorted by
length, sub-batches capped by rows and tokens) -> streaming Parquet write of one score record per row
into ``scores/``. Then an exact selection streams the score files (driver memory O(k)), and a pass over
the parts, in Ray tasks, renders the selected originals with ``score`` and ``rank``; sorted by rank
they stream into ``selected.jsonl`` and ``selected.parquet`` (``output``); the scratch folder is
removed when the command ends, done or failed.

Resume: score files already in ``scores/`` (same scoring key: what is computed, not the score's
weights; or passes that compute more, once every row is scored) are kept and their rows, found by
``source`` and ``line``, skipped without the driver holding them (``RowsRead.rows_not_done``: pieces
of the input all scored are not read again); a partly written file is removed and its rows scored
again. Rows are scored independently of their batch, so a resumed run gives the same outputs as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selectmoe.config import ConfigError, DatasetConfig, ScoringSection, SelectConfig, to_dict
from selectmoe.console import phase, say
from selectmoe.data.rejects import DataError
from selectmoe.data.subset import random_key
from selectmoe.evaluate.tasks import less_shot_rows
from selectmoe.figures import plot_score_histograms
from selectmoe.layout import (
    CALIBRATION,
    COMMON_NGRAMS,
    EVAL_TARGETS,
    REJECTS,
    ROWS_SCRATCH,
    SCORE_HISTOGRAMS,
    SCORES_DIR,
    SCORING_KEY,
    SELECTED_JSONL,
    SELECTED_PARQUET,
    SELECTED_PARTS,
    STAGE1_CONFIG,
    TARGET_EMBEDDINGS,
    TARGET_REJECTS,
    TOKENIZER_DIR,
    TRAINING_IDS,
    TRAINING_ROWS_SCRATCH,
    TRUSTED_REJECTS,
    TRUSTED_ROWS_SCRATCH,
    score_files,
)
from selectmoe.manifest import fingerprint, hash_dict, write_manifest
from selectmoe.models.loading import require_model, stage1_record, weight_bytes
from selectmoe.ray_data import (
    TOKENIZED_KEEP,
    read_rows,
    scratch_removed,
    task_as_dataset,
    token_schema,
    tokenize_rows,
)
from selectmoe.scaling import RESERVED_CPUS, cpu_threads, free_resources, use_gpu
from selectmoe.select.calibrate import (
    FEATURE_COLUMNS,
    combiner_columns,
    combiner_score,
    feature_matrix,
    fit_combiner,
    gate_direction,
    gate_sign,
)
from selectmoe.select.output import write_selection
from selectmoe.select.score import (
    NGRAMS_PER_ROW,
    SHARE_COLUMNS,
    ScorePasses,
    common_ngrams,
    reply_commonness,
    score_columns,
    score_formula,
    score_of,
    score_terms,
    scores_depend_on,
    term_scales,
)
from selectmoe.select.scorer import GateScorer
from selectmoe.select.topk import (
    REPLY_STRATUM_ROWS,
    REPLY_STRATUM_SHARE,
    above_dataset_thresholds,
    above_threshold,
    choose_n_clusters,
    column_matrix,
    dataset_quotas,
    dataset_thresholds,
    diversity_select,
    frequent_replies,
    order_by_score,
    per_dataset_k,
    random_k,
    random_per_dataset_k,
    reply_stratum,
    routing_features,
    selection_size,
    similarity_select,
    top_k,
    with_rank,
    with_reply_strata,
    without_strata,
)
from selectmoe.select.training_rows import TrainingRows, find_training_rows

logger = logging.getLogger(__name__)

GATE_SIGNED_METHODS = ("top_k", "filtered_random")  # rank by the score: a trusted set signs the gates
ONE_DATASET_CAUTION = (
    "every candidate row has the same dataset, so the score cut is corpus-wide and rows of a domain the "
    "selector finds hard can be cut with the junk (in the project's downstream proxy this left a fifth of "
    "the target-task rows); give each source its own `dataset` field (or file)"
)
BALANCED_METHODS = ("top_k", "calibrated", "random", "filtered_random")  # selection.balance=dataset
STREAM_ROWS = 65536  # rows per batch when streaming score files
# rows the term scales are measured on (scoring.combine=robust_z, scoring.prompt_gain_cap)
TERM_SAMPLE_ROWS = 65536
ACTOR_PROCESS_BYTES = 2**30  # a CPU scoring actor's own memory beside the model (scoring_actor_bytes)


def select(cfg: SelectConfig) -> Path:
    out = Path(cfg.output_dir).resolve()
    with scratch_removed(out):
        return _run(cfg, out)


def _run(cfg: SelectConfig, out: Path) -> Path:
    started = time.time()
    _check_selection(cfg)
    model_path, tokenizer_name = _selector(cfg)
    out.mkdir(parents=True, exist_ok=True)
    passes = ScorePasses.for_scoring(cfg.scoring)
    timings = {}

    # ---- read
    with phase("stage 2 select: reading and checking rows"):
        read = _read(cfg, cfg.dataset, tokenizer_name, out / REJECTS, out / ROWS_SCRATCH, passes)
        _require_rows(read.ledger.counts(), out / REJECTS)

    targets = (
        _target_embeddings(cfg, model_path, tokenizer_name, out)
        if cfg.selection.method == "similarity"
        else None
    )
    trusted = _trusted_features(cfg, model_path, tokenizer_name, out) if cfg.selection.trusted else None

    # ---- score (resumable; the key holds the inputs' fingerprints, so stored rows are rows of this sample)
    scores_dir = out / SCORES_DIR
    key = _scoring_key(cfg, model_path, read.sources, passes)
    covering = _covering_key(scores_dir, key)
    stored = _reusable_scores(scores_dir, covering or key)
    left = read.rows_not_done(lambda: _stream(stored, ["source", "line"]), columns=_scoring_input(passes))
    if covering and left.rows is not None:  # rows left, and this read prepared them for fewer passes
        stored = _reusable_scores(scores_dir, key)
        left = read.rows_not_done(lambda: _stream(stored, ["source", "line"]), columns=_scoring_input(passes))
    if left.rows_done and left.rows is not None:
        say(
            f"stage 2 select: resuming: {left.rows_done} rows were scored before (in {scores_dir}); "
            f"{left.pieces_skipped} of {left.pieces} pieces of the input are not read again"
        )
    pool, threads = _pool_args(cfg, model_path)
    t0 = time.time()
    if left.rows is None:  # e.g. a rerun with another selection method: no model is loaded
        say(f"stage 2 select: all {left.rows_done} rows were scored before; scoring skipped")
    else:
        _score(cfg, left.rows, pool, threads, model_path, tokenizer_name, out, scores_dir)
    timings["scoring_s"] = round(time.time() - t0, 2)

    # ---- select
    t0 = time.time()
    with phase("stage 2 select: selecting and writing the selected rows"):
        files = score_files(scores_dir)
        rows_scored = sum(pq.read_metadata(f).num_rows for f in files)
        excluded = find_training_rows(files, _training_ids(cfg), out / TRAINING_ROWS_SCRATCH)
        candidates = rows_scored - excluded.count()
        scaled = cfg.scoring.combine == "robust_z" or cfg.scoring.prompt_gain_cap != "none"
        scales = _term_scales(files, cfg, rows_scored) if scaled else None
        calibrated = trusted is not None and cfg.selection.method == "calibrated"
        by_formula = cfg.scoring.commonness_weight and not calibrated  # the combiner has no commonness
        for derived in (COMMON_NGRAMS, CALIBRATION):  # an earlier run's; written again below if used
            (out / derived).unlink(missing_ok=True)
        common = _common_ngrams(files, cfg, rows_scored, out) if by_formula else None
        combiner = _fit_combiner(cfg, files, candidates, excluded, trusted, out) if calibrated else None
        signed = _gate_sign(cfg, files, candidates, excluded, trusted) if trusted and not calibrated else None
        flipped = signed and signed["gate_weight"] != cfg.scoring.gate_weight
        scoring = replace(cfg.scoring, gate_weight=signed["gate_weight"]) if flipped else cfg.scoring
        rescore = _rescorer(scoring, scales, combiner, common["ngrams"] if common else None)
        formula = "calibrated combiner (log-odds of trusted)" if combiner else score_formula(scoring)
        selected, selection_info = _select(cfg, files, candidates, excluded, rescore, targets)
        timings["selection_s"] = round(time.time() - t0, 2)

        # ---- write the selected rows (originals + score + rank), rendered by Ray tasks
        t0 = time.time()
        write_selection(
            read.rows, selected, out / SELECTED_JSONL, out / SELECTED_PARQUET, out / SELECTED_PARTS
        )
    timings["write_s"] = round(time.time() - t0, 2)

    counts = read.ledger.counts()
    counts.update(
        rows_scored=rows_scored,
        rows_scored_before=left.rows_done,
        rows_excluded_training=rows_scored - candidates,
        rows_selected=selected.num_rows,
        selected_by_dataset=dict(Counter(selected["dataset"].to_pylist())) if selected.num_rows else {},
    )
    metrics = {
        "score_threshold": min(selected["score"].to_pylist()) if selected.num_rows else None,
        "score_max": max(selected["score"].to_pylist()) if selected.num_rows else None,
        "score_formula": formula,
        **({"term_scales": scales} if scales else {}),
        **({"common_ngrams": {k: v for k, v in common.items() if k != "ngrams"}} if common else {}),
        **({"calibrated": _calibration_info(combiner)} if combiner else {}),
        **({"gate_sign": signed} if signed else {}),
        **selection_info,
    }
    plot_score_histograms(
        lambda: _scored_stream(files, ["dataset", "score"], rescore),
        out / SCORE_HISTOGRAMS,
        metrics["score_threshold"],
        formula,
    )
    write_manifest(
        out,
        stage="select",
        config=cfg,
        inputs={
            "selector_model": fingerprint(model_path),
            "data": [fingerprint(s.uri) for s in read.sources],
            **({"targets": [fingerprint(t) for t in _target_paths(cfg, out)]} if targets is not None else {}),
            **({"trusted": [fingerprint(t) for t in cfg.selection.trusted]} if trusted else {}),
        },
        counts=counts,
        metrics={**metrics, "timings": timings},
        outputs={
            "score_files": SCORES_DIR,
            "selected": [SELECTED_PARQUET, SELECTED_JSONL],
            "rejects": REJECTS,
            **({"calibration": CALIBRATION} if combiner else {}),
            **({"common_ngrams": COMMON_NGRAMS} if common else {}),
            **({"trusted_rejects": TRUSTED_REJECTS} if trusted else {}),
            **(
                {
                    "target_embeddings": TARGET_EMBEDDINGS,
                    "target_rejects": TARGET_REJECTS,
                    **({"eval_targets": EVAL_TARGETS} if cfg.selection.target_eval_dir else {}),
                }
                if targets is not None
                else {}
            ),
        },
        started_at=started,
    )
    return out


# ---------------------------------------------------------------------------- helpers


def _score(
    cfg: SelectConfig, tokens, pool: dict, threads, model_path, tokenizer_name, out, scores_dir
) -> None:
    with phase(f"stage 2 select: scoring with {pool['compute'].min_size} actor(s)"):
        # one sort window per block (streaming, order kept): the pool gets many inputs to spread over actors
        tokens = tokens.repartition(target_num_rows_per_block=cfg.scoring.sort_window)
        scored = tokens.map_batches(
            GateScorer,
            batch_size=cfg.scoring.sort_window,
            fn_constructor_kwargs=_scorer_kwargs(cfg, model_path, tokenizer_name, out, threads),
            **pool,
        )
        # the writes take no CPU slot: on a small cluster the pool and the read of the rows hold every
        # CPU, and writes that need one wait for the read to end (the scores pile up in the object
        # store, none on disk for a resume)
        scored.write_parquet(str(scores_dir), ray_remote_args={"num_cpus": 0})


def _selector(cfg: SelectConfig) -> tuple[str, str]:
    """(model to load, tokenizer): a stage-1 folder names its base and carries its tokenizer."""
    path = cfg.model_checkpoint_path or cfg.selector_model.path
    folder = Path(path)
    if cfg.model_checkpoint_path and folder.is_file():
        raise ConfigError(
            f"model_checkpoint_path={path}: expected a stage-1 output folder (with {STAGE1_CONFIG}); "
            "the seed's full_rank_weights.pt files are not read"
        )
    require_model("model_checkpoint_path" if cfg.model_checkpoint_path else "selector_model.path", str(path))
    tokenizer = cfg.selector_model.tokenizer_name
    if tokenizer is None and (folder / TOKENIZER_DIR).is_dir():
        tokenizer = str(folder / TOKENIZER_DIR)
    stage1 = stage1_record(folder)
    if tokenizer is None and stage1 is not None:
        tokenizer = stage1["tokenizer"]
    return str(path), tokenizer or str(path)


def _scoring_key(cfg: SelectConfig, model_path: str, sources, passes: ScorePasses) -> dict:
    """What the scores depend on (config, the passes it runs, selector weights, input files); score
    files written under another key are not reused. The score's weights are not in it: the selection
    recomputes every row's score from the stored terms."""
    model = Path(model_path)
    weights = (
        {p.name: fingerprint(p) for p in sorted(model.glob("*")) if p.is_file()} if model.is_dir() else {}
    )
    return {
        "model": model_path,
        "weights": hash_dict(weights),
        "scoring": scores_depend_on(cfg.scoring),
        "passes": asdict(passes),
        "dataset": to_dict(cfg.dataset),
        "selector_model": to_dict(cfg.selector_model),
        "seed": cfg.seed,
        "inputs": hash_dict({source.uri: fingerprint(source.uri) for source in sources}),
        "resumed_by": ["source", "line"],  # score files before this held no source and line
        "stores": ["reply_redundancy", "reply_ngrams", "reply_hash"],  # nor these columns
        # until 2026-12-07 the redundancy counted every n-gram the row held before (an answer copied from
        # its prompt too): score files of then hold that one
        "reply_redundancy": "the larger of the reply's repeats and the request's share restated",
    }


def _covering_key(scores_dir: Path, key: dict) -> dict | None:
    """The key the score files in ``scores_dir`` were written under when it differs from ``key`` only
    in passes that compute more (e.g. a sweep that sets a weight to 0 after scoring with it): their
    columns hold every term ``key`` needs. None otherwise."""
    key_file = scores_dir / SCORING_KEY
    if not key_file.exists():
        return None
    stored = json.loads(key_file.read_text())
    if stored == key or {**stored, "passes": key["passes"]} != key:
        return None
    have, need = stored["passes"], key["passes"]
    covers = all(have[name] == value or value is False for name, value in need.items())
    return stored if covers else None


def _reusable_scores(scores_dir: Path, key: dict) -> list[Path]:
    """The score files already written under ``key``; clears the folder when the key differs and
    removes files an interrupted write left unreadable (their rows are scored again)."""
    key_file = scores_dir / SCORING_KEY
    if scores_dir.exists() and (not key_file.exists() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(scores_dir)
    scores_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, sort_keys=True))
    readable = []
    for path in score_files(scores_dir):
        try:
            pq.read_metadata(path)
            readable.append(path)
        except (pa.ArrowInvalid, OSError):
            logger.warning(
                "removing unreadable score file %s (an interrupted write); its rows are rescored", path
            )
            path.unlink()
    return readable


def _stream(files: list[Path], columns: list[str], skip: TrainingRows | None = None):
    """The score files' ``columns`` in batches, in file order; the rows ``skip`` names (stage 1's
    training rows) left out."""
    for index, path in enumerate(files):
        offset = 0
        for b in pq.ParquetFile(path).iter_batches(STREAM_ROWS, columns=columns):
            batch = pa.Table.from_batches([b])
            kept = skip.kept(index, offset, batch.num_rows) if skip is not None else None
            offset += batch.num_rows
            yield batch if kept is None else batch.filter(pa.array(kept))


def _scored_stream(files: list[Path], columns: list[str], rescore, skip: TrainingRows | None = None):
    """``_stream`` whose ``score`` is recomputed by ``rescore`` (``_rescorer``) from the stored terms."""
    needed, score_fn = rescore
    read = [c for c in columns if c != "score"] + [t for t in needed if t not in columns]
    for batch in _stream(files, read, skip):
        score = score_fn({name: column_matrix(batch[name]) for name in needed})
        yield batch.append_column("score", pa.array(score, pa.float64())).select(columns)


def _rescorer(scoring, scales: dict | None, combiner: dict | None, common: np.ndarray | None = None):
    """(columns read, row score function): the calibrated combiner, else ``scoring``'s formula with this
    run's weights (a gate weight the trusted set flipped included; the score files' own ``score`` used
    the weights they were scored with), robust z-scores or a capped prompt gain from ``scales``, the
    reply commonness from the corpus's ``common`` n-grams."""
    if combiner is not None:
        return combiner_columns(combiner), lambda columns: combiner_score(combiner, columns)
    return score_columns(scoring), lambda columns: score_of(columns, scoring, scales, common)


def _seeded_sample(batches, seed: int, rows: int):
    """``batches`` (of ``rows`` rows in all) thinned to a seeded sample of at most ~``TERM_SAMPLE_ROWS``
    rows, by a hash of the id (independent of order); all of them below that."""
    share = min(1.0, TERM_SAMPLE_ROWS / max(rows, 1))
    for batch in batches:
        yield batch.filter(pc.less(random_key(seed, batch["id"]), share)) if share < 1 else batch


def _term_scales(files: list[Path], cfg: SelectConfig, rows_scored: int) -> dict:
    """``term_scales`` on a seeded sample of the scored rows (``_seeded_sample``); the reply redundancy and
    commonness, shares on every model's scale, have none."""
    parts: dict[str, list] = {}
    scaled = [name for name in score_columns(cfg.scoring) if name not in SHARE_COLUMNS]
    for batch in _seeded_sample(_stream(files, ["id", *scaled]), cfg.seed, rows_scored):
        columns = {name: column_matrix(batch[name]) for name in scaled}
        for name, values in score_terms(**columns).items():
            parts.setdefault(name, []).append(values)
    return term_scales({name: np.concatenate(values) for name, values in parts.items()})


def _common_ngrams(files: list[Path], cfg: SelectConfig, rows_scored: int, out: Path) -> dict:
    """``common_ngrams`` of a seeded sample of the scored rows (``_seeded_sample``), written to
    ``layout.COMMON_NGRAMS`` (the selection's scores can be recomputed from the outputs), with the sample's
    size and the share of its rows the commonness term penalises (for the manifest)."""
    sample = [
        column_matrix(batch["reply_ngrams"])
        for batch in _seeded_sample(_stream(files, ["id", "reply_ngrams"]), cfg.seed, rows_scored)
    ]
    ngrams = np.concatenate(
        [s.reshape(-1, NGRAMS_PER_ROW) for s in sample] or [np.zeros((0, NGRAMS_PER_ROW), dtype=np.uint32)]
    )
    common = common_ngrams(ngrams, cfg.scoring.common_ngram_share)
    penalised = reply_commonness(ngrams, common) > cfg.scoring.commonness_tolerance
    (out / COMMON_NGRAMS).write_text(json.dumps(common.tolist()))
    return {
        "ngrams": common,
        "count": len(common),
        "sample_rows": len(ngrams),
        "sample_share_penalised": round(float(penalised.mean()), 4) if len(ngrams) else 0.0,
    }


def _training_ids(cfg: SelectConfig) -> Path | None:
    """Stage 1's ``training_ids.parquet`` (the ids it trained on) when ``selection.exclude_training_rows``
    and the stage-1 folder has one; None otherwise."""
    path = Path(cfg.model_checkpoint_path or "") / TRAINING_IDS
    if not (cfg.selection.exclude_training_rows and cfg.model_checkpoint_path and path.exists()):
        return None
    return path


def _check_selection(cfg: SelectConfig) -> None:
    """Selection keys that need each other: checked before any scoring."""
    method, p = cfg.selection.method, cfg.clustering_params
    if method == "threshold" and cfg.selection.threshold is None:
        raise ConfigError("selection.method=threshold needs selection.threshold")
    if method == "diversity" and not cfg.scoring.store_routing:
        raise ConfigError("selection.method=diversity needs scoring.store_routing=true")
    has_targets = bool(cfg.selection.targets or cfg.selection.target_eval_dir)
    if method == "similarity" and not (cfg.scoring.store_embeddings and has_targets):
        raise ConfigError(
            "selection.method=similarity needs selection.targets (files of target-task examples) or "
            "selection.target_eval_dir (evaluation sets whose shots are the examples) and "
            "scoring.store_embeddings=true (preset=similarity sets both but the targets)"
        )
    if has_targets and method != "similarity":
        raise ConfigError(
            f"selection.targets and selection.target_eval_dir are read only by selection.method=similarity "
            f"(method is {method}); "
            "drop it or set selection.method=similarity"
        )
    if method == "calibrated" and not cfg.selection.trusted:
        raise ConfigError(
            "selection.method=calibrated needs selection.trusted (files of rows you trust: a few hundred "
            "of the target tasks, clean rows of your sources)"
        )
    if cfg.selection.trusted and method != "calibrated":
        if method not in GATE_SIGNED_METHODS:
            raise ConfigError(
                f"selection.trusted is read by selection.method=calibrated, or sets the gate term's sign "
                f"for a method that ranks by score ({', '.join(GATE_SIGNED_METHODS)}); method is {method}"
            )
        if cfg.scoring.gate_weight == 0:
            raise ConfigError(
                f"selection.trusted sets the sign of the gate term with selection.method={method}, and "
                "scoring.gate_weight is 0 (the gates do not rank rows): drop it, set scoring.gate_weight, "
                "or set selection.method=calibrated"
            )
    if cfg.selection.balance == "dataset" and method not in BALANCED_METHODS:
        raise ConfigError(
            f"selection.balance=dataset keeps the corpus mix for a method that picks k rows "
            f"({', '.join(BALANCED_METHODS)}); method is {method}"
        )
    if uses_reply_strata(cfg.selection) and method != "filtered_random":
        raise ConfigError(
            "selection.strata=reply gives selection.method=filtered_random's filter and draw a stratum per "
            f"frequent reply of each dataset; method is {method}"
        )
    if uses_reply_strata(cfg.selection) and cfg.selection.quotas:
        raise ConfigError(
            "selection.strata=reply shares each dataset's quota among its frequent replies by their rows; "
            "selection.quotas set the datasets' quotas themselves: drop one of them"
        )
    if cfg.selection.quotas and not _balanced(cfg.selection):
        raise ConfigError(
            "selection.quotas are the per-dataset quotas of selection.balance=dataset "
            f"(balance is {cfg.selection.balance}, method {method}); set it"
        )
    if p.auto_k and not (len(p.k_range) == 2 and 2 <= p.k_range[0] <= p.k_range[1]):
        raise ConfigError(
            f"clustering_params.k_range={p.k_range}: expected [lowest, highest] with 2 <= lowest <= highest"
        )


def _select(
    cfg: SelectConfig,
    score_files: list[Path],
    candidates: int,
    excluded: TrainingRows,
    rescore,
    targets: dict[str, np.ndarray] | None,
) -> tuple[pa.Table, dict]:
    """(the selected rows' id, dataset, score, rank (and target_task); what the method decided, for the
    manifest)."""
    method = cfg.selection.method
    info: dict = {}
    extra = {"diversity": ["routing"], "similarity": ["embedding"]}.get(method, [])
    if uses_reply_strata(cfg.selection):
        extra = ["reply_hash"]
    columns = ["id", "dataset", "score", *extra]

    def batches():
        return _scored_stream(score_files, columns, rescore, excluded)

    def replies():  # what finds the frequent replies: no score to recompute
        return _stream(score_files, ["id", "dataset", "reply_hash"], excluded)

    k = selection_size(candidates, cfg.selection_percentage, cfg.selection.count)
    by_dataset = _balanced(cfg.selection)
    if by_dataset and method in ("top_k", "calibrated", "random"):
        counts = _rows_by_dataset(score_files, excluded)
        quotas = _quotas(cfg, counts, k)
        order = "a seeded random draw" if method == "random" else "the best-scored rows"
        info["balance"] = {
            "quotas": dict(sorted(quotas.items())),
            "rows_by_dataset": dict(sorted(counts.items())),
            "chosen_by": f"per dataset at its quota (selection.balance), {order}",
        }
    if method in ("top_k", "calibrated"):  # calibrated: the score is the combiner's (``rescore``)
        chosen = per_dataset_k(batches(), quotas) if by_dataset else top_k(batches(), k)
    elif method == "random":
        drawn = (
            random_per_dataset_k(batches(), quotas, cfg.seed)
            if by_dataset
            else random_k(batches(), k, cfg.seed)
        )
        chosen = order_by_score(drawn)
    elif method == "filtered_random":
        chosen, info["filtered_random"] = _filtered_random(cfg, batches, candidates, k, replies)
    elif method == "threshold":
        chosen = above_threshold(batches(), cfg.selection.threshold)
    elif method == "similarity":
        chosen = similarity_select(batches(), targets, k)
        info["similarity"] = {
            "target_examples": {task: len(examples) for task, examples in sorted(targets.items())},
            "selected_per_task": dict(sorted(Counter(chosen["target_task"].to_pylist()).items()))
            if chosen.num_columns
            else {},
            "chosen_by": "round-robin over tasks; per task the highest cosine similarity to its examples",
        }
    else:
        table = pa.concat_tables(list(batches()))
        p = cfg.clustering_params
        n_clusters = p.k
        if p.auto_k:
            n_clusters, silhouettes = choose_n_clusters(
                routing_features(table), tuple(p.k_range), p.max_iters, cfg.seed
            )
            info["clustering"] = {
                "method": cfg.clustering_method,
                "k": n_clusters,
                "chosen_by": f"highest mean cosine silhouette over k in {p.k_range}",
                "silhouette": {str(n): round(s, 6) for n, s in silhouettes.items()},
            }
        else:
            info["clustering"] = {
                "method": cfg.clustering_method,
                "k": n_clusters,
                "chosen_by": "clustering_params.k",
            }
        chosen, _ = diversity_select(table, k, n_clusters, p.max_iters, cfg.seed)
        chosen = chosen.drop_columns(["routing"])
    if chosen.num_columns == 0:
        empty = {
            "id": pa.array([], pa.string()),
            "dataset": pa.array([], pa.string()),
            "score": pa.array([], pa.float64()),
            "rank": pa.array([], pa.int64()),
        }
        return pa.table(empty), info
    kept = ["id", "dataset", "score"] + (["target_task"] if method == "similarity" else [])
    return with_rank(chosen.select(kept)), info


def _balanced(selection) -> bool:
    """Whether ``selection.balance`` keeps the corpus mix (``auto``: for ``filtered_random`` only)."""
    if selection.balance == "auto":
        return selection.method == "filtered_random"
    return selection.balance == "dataset"


def uses_reply_strata(selection) -> bool:
    """Whether ``selection.strata`` sets each frequent reply apart (``auto``: for ``filtered_random``
    without ``selection.quotas``, which are per dataset)."""
    if selection.strata == "auto":
        return selection.method == "filtered_random" and not selection.quotas
    return selection.strata == "reply"


def _rows_by_dataset(files: list[Path], excluded: TrainingRows) -> Counter:
    counts = Counter()
    for batch in _stream(files, ["dataset"], excluded):
        counts.update(batch["dataset"].to_pylist())
    return counts


def _quotas(cfg: SelectConfig, rows_by_dataset: Counter, k: int) -> dict[str, int]:
    """``topk.dataset_quotas`` of the candidate rows; ``selection.quotas`` naming a dataset the corpus
    does not have is an error."""
    unknown = sorted(set(cfg.selection.quotas or {}) - set(rows_by_dataset))
    if unknown:
        raise ConfigError(
            f"selection.quotas names {unknown}, not datasets of this corpus (its datasets: "
            f"{sorted(rows_by_dataset)})"
        )
    return dataset_quotas(dict(rows_by_dataset), k, cfg.selection.quotas)


def _filtered_random(cfg: SelectConfig, batches, candidates: int, k: int, replies) -> tuple[pa.Table, dict]:
    """A seeded random draw from the best ``selection.keep_fraction`` of each dataset (thresholds from
    a seeded sample of at most ~``TERM_SAMPLE_ROWS`` rows, exact below that); with
    ``selection.balance=dataset`` each dataset keeps its share of the corpus (or ``selection.quotas``)
    exactly, else one draw over every kept row keeps it in expectation. With reply strata
    (``uses_reply_strata``) each frequent reply of a dataset (``topk.frequent_replies`` of the same seeded
    sample of ``replies()``: id, dataset, reply_hash batches) is a stratum of its own with its own
    threshold, and the dataset's other rows one more; each dataset's quota is then shared among its
    strata by their rows."""
    sampled: dict[str, list] = {}
    rows, datasets, owners = Counter(), Counter(), {}  # rows per stratum and dataset; a stratum's dataset
    frequent, examples = None, {}
    if uses_reply_strata(cfg.selection):
        sample = [
            b.select(["id", "dataset", "reply_hash"]) for b in _seeded_sample(replies(), cfg.seed, candidates)
        ]
        sample = (
            pa.concat_tables(sample).to_pydict() if sample else {"id": [], "dataset": [], "reply_hash": []}
        )
        frequent = frequent_replies(sample["dataset"], sample["reply_hash"])
        for i, name, reply in sorted(zip(sample["id"], sample["dataset"], sample["reply_hash"])):
            if (name, reply) in frequent:
                examples.setdefault(reply_stratum(name, reply), i)

    def stratified():
        return batches() if frequent is None else (with_reply_strata(b, frequent) for b in batches())

    def counted():
        for batch in stratified():
            strata = batch["dataset"].to_pylist()
            real = batch["source_dataset"].to_pylist() if frequent is not None else strata
            rows.update(strata)
            datasets.update(real)
            owners.update(zip(strata, real))
            yield batch

    for batch in _seeded_sample(counted(), cfg.seed, candidates):
        for name, score in zip(batch["dataset"].to_pylist(), batch["score"].to_pylist()):
            sampled.setdefault(name, []).append(score)
    thresholds = dataset_thresholds(sampled, cfg.selection.keep_fraction)
    kept = Counter()

    def kept_rows():
        for batch in above_dataset_thresholds(stratified(), thresholds):
            kept.update(batch["dataset"].to_pylist())
            yield batch

    if not _balanced(cfg.selection):
        chosen = order_by_score(random_k(kept_rows(), k, cfg.seed))
        quotas = {}
        short = {"all datasets": (kept.total(), k)} if kept.total() < k else {}
    else:
        quotas = _quotas(cfg, datasets, k)
        if frequent is not None:
            quotas = _stratum_quotas(quotas, rows, owners)
        chosen = random_per_dataset_k(kept_rows(), quotas, cfg.seed)
        short = {name: (kept[name], quota) for name, quota in quotas.items() if kept[name] < quota}
    if short:
        raise ConfigError(
            f"selection.keep_fraction={cfg.selection.keep_fraction} keeps fewer rows than the selection "
            f"takes ((rows kept, rows to take): {short}); raise it or select fewer rows"
        )
    if frequent is not None:
        chosen = without_strata(chosen)
    cut_corpus_wide = len(datasets) == 1 and cfg.selection.keep_fraction < 1
    info = {
        **({"caution": ONE_DATASET_CAUTION} if cut_corpus_wide else {}),
        "keep_fraction": cfg.selection.keep_fraction,
        "dataset_thresholds": dict(sorted(thresholds.items())),
        "rows_kept_by_dataset": dict(sorted(kept.items())),
        "threshold_sample_rows": sum(len(v) for v in sampled.values()),
        **({"quotas": dict(sorted(quotas.items()))} if quotas else {}),
        "chosen_by": (
            "per dataset at its quota (selection.balance), a seeded random draw among the rows at "
            "or above the dataset's score threshold"
            if quotas
            else "a seeded random draw among the rows at or above their dataset's score threshold"
        ),
    }
    if frequent is not None:
        info["strata"] = "reply"
        info["frequent_replies_by_dataset"] = dict(sorted(Counter(name for name, _ in frequent).items()))
        info["frequent_reply_examples"] = dict(sorted(examples.items()))  # a row id of each, to read it
        info["chosen_by"] += (
            f"; a reply that {REPLY_STRATUM_ROWS} or more and {REPLY_STRATUM_SHARE:.0%} of a dataset's "
            "sampled rows give (an answer label) is a stratum of its own, with its own threshold"
            + (" and a share of the dataset's quota" if quotas else "")
            + ", the dataset's other rows one more (selection.strata)"
        )
    if cut_corpus_wide:
        say(f"stage 2 select: caution: {ONE_DATASET_CAUTION}")
    return chosen, info


def _stratum_quotas(quotas: dict[str, int], rows: Counter, owners: dict[str, str]) -> dict[str, int]:
    """Each dataset's quota shared among its strata (``owners``: a stratum's dataset) in proportion to
    their ``rows`` (largest remainder): every dataset keeps exactly its quota."""
    shared = {}
    for name, quota in quotas.items():
        shared.update(dataset_quotas({s: n for s, n in rows.items() if owners[s] == name}, quota, None))
    return shared


def _target_embeddings(
    cfg: SelectConfig, model_path: str, tokenizer_name: str, out: Path
) -> dict[str, np.ndarray]:
    """{task: (examples, hidden) embeddings} of ``_target_paths``, read like the corpus (rejects in
    ``layout.TARGET_REJECTS``) and embedded by the selector the corpus is scored with, in a pool of one
    scoring actor (a second model load, before the corpus's); also written to ``layout.TARGET_EMBEDDINGS``."""
    if cfg.selection.target_eval_dir:
        with (out / EVAL_TARGETS).open("w", encoding="utf-8") as fh:
            for row in less_shot_rows(cfg.selection.target_eval_dir):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths = _target_paths(cfg, out)
    source = DatasetConfig(data_path=paths, max_sequence_length=cfg.dataset.max_sequence_length)
    with phase("stage 2 select: embedding the target examples"):
        read = read_rows(source, cfg.data, seed=cfg.seed, tokenizer_name=tokenizer_name)
        read.ledger.write_rejects(out / TARGET_REJECTS)
        rows = read.rows.map_batches(task_as_dataset, batch_format="pyarrow")
        tokens = tokenize_rows(rows, tokenizer_name, cfg.dataset.max_sequence_length, "assistant")
        embedding_only = ScoringSection(store_embeddings=True, tokens_per_batch=cfg.scoring.tokens_per_batch)
        embedded = _one_actor_pass(cfg, model_path, tokenizer_name, out, tokens, embedding_only)
        embedded_rows = embedded.select_columns(["id", "dataset", "embedding"]).take_all()
    if not embedded_rows:
        raise ConfigError(f"target examples {paths}: no valid row (see {out / TARGET_REJECTS})")
    tasks = np.asarray([r["dataset"] for r in embedded_rows])
    matrix = np.stack([np.asarray(r["embedding"]) for r in embedded_rows])
    flat = pa.array(matrix.astype(np.float32).ravel())
    pq.write_table(
        pa.table(
            {
                "task": pa.array(tasks.tolist(), pa.string()),
                "id": pa.array([r["id"] for r in embedded_rows], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1]),
            }
        ),
        out / TARGET_EMBEDDINGS,
    )
    return {task: matrix[tasks == task] for task in sorted(set(tasks))}


def _trusted_features(cfg: SelectConfig, model_path: str, tokenizer_name: str, out: Path) -> dict:
    """{column: values}: ``selection.trusted`` rows scored like the corpus (a one-actor pool; rejects
    in ``layout.TRUSTED_REJECTS``): every pass of the corpus for the calibrated combiner, the gates
    alone for the gate term's sign."""
    source = DatasetConfig(
        data_path=list(cfg.selection.trusted), max_sequence_length=cfg.dataset.max_sequence_length
    )
    scoring = cfg.scoring
    if cfg.selection.method != "calibrated":
        scoring = ScoringSection(tokens=cfg.scoring.tokens, tokens_per_batch=cfg.scoring.tokens_per_batch)
    passes = ScorePasses.for_scoring(scoring)
    with phase("stage 2 select: scoring the trusted rows"):
        read = _read(cfg, source, tokenizer_name, out / TRUSTED_REJECTS, out / TRUSTED_ROWS_SCRATCH, passes)
        tokens = read.rows_not_done(lambda: iter(()), columns=_scoring_input(passes)).rows
        rows = _one_actor_pass(cfg, model_path, tokenizer_name, out, tokens, scoring).take_all()
    if len(rows) < 2:
        raise ConfigError(
            f"selection.trusted={cfg.selection.trusted}: {len(rows)} usable row(s), at least 2 are needed "
            f"(see {out / TRUSTED_REJECTS})"
        )
    present = [c for c in FEATURE_COLUMNS if c in rows[0]]
    return {c: np.asarray([np.asarray(r[c], dtype=np.float64) for r in rows]) for c in present}


def _read(
    cfg: SelectConfig, source: DatasetConfig, tokenizer_name: str, rejects: Path, rows_dir: Path, passes
):
    """``read_rows``' result for ``source``, its rejects written to ``rejects``: the text is read once,
    by the scan, which writes the rows in the subset with the tokens ``passes`` score to ``rows_dir``
    (emptied first; ``select`` removes it when it returns or fails)."""
    shutil.rmtree(rows_dir, ignore_errors=True)
    read = read_rows(
        source,
        cfg.data,
        seed=cfg.seed,
        tokenizer_name=tokenizer_name,
        rows_dir=rows_dir,
        tokens=True,
        replies_alone=passes.reply_only,
    )
    read.ledger.write_rejects(rejects)
    return read


def _require_rows(counts: dict, rejects: Path) -> None:
    """No row to score is a mistake (every row rejected, or none in the sample), not an empty selection."""
    if counts["rows_sampled"]:
        return
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts["rejected_by_reason"].items())
    accepted = counts["rows_accepted"]
    raise DataError(
        f"no row to score: {counts['rows_read']} read, {counts['rows_rejected']} rejected"
        + (f" ({reasons}; see {rejects})" if reasons else "")
        + (f"; the {accepted} accepted are all outside dataset.subset_ratio's sample" if accepted else "")
    )


def _scoring_input(passes) -> list[str]:
    """The columns of the rows written by ``_read`` that the scorer reads for ``passes`` (and passes on)."""
    return [*TOKENIZED_KEEP, *token_schema(passes.reply_only).names]


def _corpus_sample(
    cfg: SelectConfig, files: list[Path], candidates: int, excluded: TrainingRows, columns: list[str]
) -> dict[str, np.ndarray]:
    """``columns`` of a seeded sample (``_seeded_sample``) of the ``candidates`` scored corpus rows
    (stage-1 training rows left out): what trusted rows are compared with."""
    parts: dict[str, list] = {}
    for batch in _seeded_sample(_stream(files, ["id", *columns], excluded), cfg.seed, candidates):
        for name in columns:
            parts.setdefault(name, []).append(column_matrix(batch[name]))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _gate_sign(
    cfg: SelectConfig, files: list[Path], candidates: int, excluded: TrainingRows, trusted: dict
) -> dict:
    """``calibrate.gate_sign`` of the trusted rows against the corpus sample."""
    corpus = _corpus_sample(cfg, files, candidates, excluded, ["layer_scores"])
    return gate_sign(trusted["layer_scores"], corpus["layer_scores"], cfg.scoring.gate_weight)


def _fit_combiner(
    cfg: SelectConfig, files: list[Path], candidates: int, excluded: TrainingRows, trusted: dict, out: Path
) -> dict:
    """The calibrated combiner: trusted rows against ``_corpus_sample``; written to
    ``layout.CALIBRATION``."""
    corpus = _corpus_sample(cfg, files, candidates, excluded, list(trusted))
    trusted_x, names = feature_matrix(trusted)
    combiner = fit_combiner(trusted_x, feature_matrix(corpus)[0], names, cfg.seed)
    (out / CALIBRATION).write_text(json.dumps(combiner, indent=2))
    return combiner


def _calibration_info(combiner: dict) -> dict:
    return {
        "cv_auroc": combiner["cv_auroc"],
        "trusted_rows": combiner["trusted_rows"],
        "corpus_rows": combiner["corpus_rows"],
        "coefficients": dict(zip(combiner["features"], combiner["coefficients"])),
        "gate_direction": gate_direction(combiner),
        "combiner": CALIBRATION,
        "chosen_by": f"top rows by a logistic regression on the stored features, fitted to tell "
        f"selection.trusted from the corpus (cross-validated AUROC {combiner['cv_auroc']:.3f})",
    }


def _one_actor_pass(cfg: SelectConfig, model_path: str, tokenizer_name: str, out: Path, tokens, scoring):
    """``tokens`` through a pool of one ``GateScorer`` under ``scoring`` (rows scored apart from the
    corpus: target examples, trusted rows; a second model load, before the corpus's pool)."""
    pool, threads = _pool_args(cfg, model_path, actors=1)
    kwargs = {**_scorer_kwargs(cfg, model_path, tokenizer_name, out, threads), "scoring": scoring}
    kwargs["fail_once_marker"] = None
    return tokens.map_batches(GateScorer, fn_constructor_kwargs=kwargs, **pool)


def _target_paths(cfg: SelectConfig, out: Path) -> list[str]:
    """``selection.targets``, and the eval shots' file when ``selection.target_eval_dir`` is set."""
    eval_shots = [str(out / EVAL_TARGETS)] if cfg.selection.target_eval_dir else []
    return list(cfg.selection.targets or []) + eval_shots


def _scorer_kwargs(
    cfg: SelectConfig, model_path: str, tokenizer_name: str, out: Path, threads: int | None
) -> dict:
    from selectmoe.data.template import ensure_pad_token, load_tokenizer

    return {
        "model_path": model_path,
        "scoring": cfg.scoring,
        "pad_token_id": ensure_pad_token(load_tokenizer(tokenizer_name)).pad_token_id,
        "dtype": cfg.selector_model.dtype,
        "attn_implementation": cfg.selector_model.attn_implementation,
        "max_rows": cfg.data_process.batch_size,
        "cpu_threads": threads,
        "fail_once_marker": str(out / ".injected_actor_failure")
        if cfg.scoring.inject_actor_failure
        else None,
    }


def _pool_args(cfg: SelectConfig, model_path: str, actors: int | None = None) -> tuple[dict, int | None]:
    """(Actor pool, torch threads per actor): ``actors`` or ``scoring.num_actors``, else one GPU per actor on
    GPU clusters; on CPU, the free CPUs minus one left for Ray Data (``selectmoe.scaling.cpu_threads``),
    and no more actors than Ray's free memory holds copies of the model (``scoring_actor_bytes``)."""
    from ray.data import ActorPoolStrategy

    # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a killed actor is replaced and
    # its batch retried
    actors = actors or cfg.scoring.num_actors
    if use_gpu(cfg.scaling):
        actors = actors or max(1, int(free_resources().get("GPU", 1)))
        return {"compute": ActorPoolStrategy(size=actors), "num_gpus": 1}, None
    free = free_resources()
    cpus = free.get("CPU", 1.0)
    if not actors:
        per_actor = scoring_actor_bytes(model_path, cfg.selector_model.dtype)
        actors = cpu_pool_size(cpus, free.get("memory", 0), per_actor)
        if actors < max(1, int(cpus - RESERVED_CPUS)):
            say(
                f"stage 2 select: {actors} scoring actor(s), not one per free CPU: each holds a copy of the "
                f"model (~{per_actor / 2**30:.1f} GiB) and Ray has {free.get('memory', 0) / 2**30:.1f} GiB of "
                "memory free; scoring.num_actors overrides"
            )
    per_actor_cpus = round(max(0.25, (cpus - RESERVED_CPUS) / actors), 2)
    return {"compute": ActorPoolStrategy(size=actors), "num_cpus": per_actor_cpus}, cpu_threads(actors)


def cpu_pool_size(free_cpus: float, free_memory: float, actor_bytes: int) -> int:
    """CPU scoring actors: one per free CPU but the one left for Ray Data, as many as ``free_memory``
    holds, at least one."""
    return max(1, min(int(free_cpus - RESERVED_CPUS), int(free_memory // actor_bytes)))


def scoring_actor_bytes(model_path: str, dtype: str) -> int:
    """Memory one CPU scoring actor needs, roughly: its copy of the weights, a quarter more for the load
    and a batch's activations, and the process itself (torch, transformers). At OLMoE-1B-7B's shape in
    bf16 that is a little above what the actor measured (benchmarks/README.md, real shapes)."""
    return int(1.25 * weight_bytes(model_path, dtype)) + ACTOR_PROCESS_BYTES

"""Batch scoring: a callable class Ray Data runs in an actor pool (one model per actor).

Each call gets a window of tokenised rows, sorts it by length, cuts it into sub-batches capped by
rows and padded tokens, runs the one scoring pass (``score.score_batch``) on each, and returns one
score record per row in the window's order. A reply-only pass (prompt gain) sorts and cuts the window
again by the replies' own lengths.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from selectmoe.models.loading import (
    environment_variable,
    load_select_moe,
    release_freed_memory,
    resolve_dtype,
)
from selectmoe.select.score import ScorePasses, score_batch, score_of
from selectmoe.training.common import set_cpu_threads

# columns the score files keep beside id, dataset, score, layer_scores, n_tokens and n_scored_tokens
OPTIONAL_COLUMNS = (
    "routing", "embedding", "nll", "nll_without_prompt", "nll_gates_shut", "gate_slope", "gate_curvature",
    "driving_force", "reply_redundancy", "reply_ngrams", "reply_hash",
)  # fmt: skip
WHERE_READ = ("source", "line")  # passed through: a resumed run finds the rows scored before by them
TOKEN_FIELDS = ("input_ids", "labels", "reply_input_ids", "reply_labels")  # what score_batch reads
DEFAULT_TOKENS_PER_BATCH = {"cuda": 16384, "cpu": 4096}  # scoring.tokens_per_batch=0
DEFAULT_ROWS_PER_BATCH = {"cuda": 128, "cpu": 32}  # data_process.batch_size=0
WARM_UP_TOKENS = 64  # the longer of the two rows of the actor's warm-up pass


def uncached_onednn():
    """A block in which oneDNN builds its first matmul without its cache of built matmuls
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``, unless the environment sets it): oneDNN reads the variable
    then, once, so the process stays uncached; the variable is restored after, so processes started
    later (a local Ray, a Train worker) keep the cache.

    oneDNN keeps up to 1,024 built matmuls, each with scratch memory of its own, keyed by shape, and an
    MoE's experts see a new token count in nearly every batch: at OLMoE-1B-7B's shape it took a scoring
    actor from 1.23x to 1.45x the weights, above what CPU pools are sized by (``scoring_actor_bytes``).
    It costs some speed (benchmarks/README.md, real shapes). Training keeps the cache: its backward
    re-builds every matmul without it."""
    return environment_variable("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0", unless_set=True)


class GateScorer:
    def __init__(
        self,
        model_path: str,
        *,
        scoring,
        pad_token_id: int,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        max_rows: int = 0,
        cpu_threads: int | None = None,
        fail_once_marker: str | None = None,
    ):
        set_cpu_threads(cpu_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.scoring = scoring
        self.pad_token_id = pad_token_id
        self.max_rows = max_rows or DEFAULT_ROWS_PER_BATCH[self.device.type]
        self.max_tokens = scoring.tokens_per_batch or DEFAULT_TOKENS_PER_BATCH[self.device.type]
        self.fail_once_marker = fail_once_marker
        with uncached_onednn() if self.device.type == "cpu" else nullcontext():  # the warm-up builds matmuls
            self._load(model_path, scoring, dtype, attn_implementation)

    def _load(self, model_path: str, scoring, dtype: str, attn_implementation: str) -> None:
        self.passes = ScorePasses.for_scoring(scoring)
        self.model = load_select_moe(
            model_path,
            dtype=resolve_dtype(dtype, self.device),
            attn_implementation=attn_implementation,
            keep_base_weights=self.passes.nll_model == "base",
        ).to(self.device)
        if self.passes.nll_model == "base":
            self.model.base_weights = {k: v.to(self.device) for k, v in self.model.base_weights.items()}
        self.model.eval().requires_grad_(False)  # D2's derivatives are taken with respect to the gates only
        self._warm_up()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._maybe_die()
        lengths = np.asarray([len(x) for x in batch["input_ids"]])
        full_rows, reply_only = self.passes.reply_only_apart()
        columns = self._columns(batch, lengths, full_rows)
        if reply_only is not None:
            reply_lengths = np.asarray([len(x) for x in batch["reply_input_ids"]])
            columns.update(self._columns(batch, reply_lengths, reply_only))
        result = {
            "id": batch["id"],
            "dataset": batch["dataset"],
            # the score files' own score: without the commonness, which needs the corpus (select.driver)
            "score": score_of(
                columns, replace(self.scoring, commonness_weight=0.0, commonness_tolerance=0.0)
            ),
            "layer_scores": list(columns["layer_scores"]),
            "n_tokens": lengths.astype(np.int64),
            "n_scored_tokens": columns["n_scored_tokens"],
        }
        for name in OPTIONAL_COLUMNS:
            if name in columns:
                result[name] = list(columns[name]) if columns[name].ndim > 1 else columns[name]
        for name in WHERE_READ:
            if name in batch:
                result[name] = batch[name]
        return result

    def _columns(self, batch: dict[str, np.ndarray], lengths: np.ndarray, passes) -> dict[str, np.ndarray]:
        """``score_batch``'s columns for the window, in its order: rows sorted by ``lengths`` (the
        length of what ``passes`` reads) and cut into sub-batches (``_chunks``)."""
        order = np.argsort(lengths, kind="stable")
        parts, positions = [], []
        for chunk in self._chunks(order, lengths):
            rows = [{name: batch[name][i] for name in TOKEN_FIELDS if name in batch} for i in chunk]
            parts.append(score_batch(self.model, rows, passes, self.pad_token_id))
            positions.extend(chunk)
            if self.device.type == "cpu":
                release_freed_memory()
        inverse = np.empty(len(positions), dtype=np.int64)
        inverse[np.asarray(positions, dtype=np.int64)] = np.arange(len(positions))
        return {name: np.concatenate([p[name] for p in parts])[inverse] for name in parts[0]}

    def _chunks(self, order: np.ndarray, lengths: np.ndarray):
        """Consecutive rows of the length order, at most ``max_rows`` and ``max_tokens`` padded tokens."""
        chunk: list[int] = []
        for i in order:  # ascending length: the row being added is the chunk's longest
            if chunk and (len(chunk) + 1 > self.max_rows or lengths[i] * (len(chunk) + 1) > self.max_tokens):
                yield chunk
                chunk = []
            chunk.append(int(i))
        if chunk:
            yield chunk

    def _warm_up(self) -> None:
        """One throwaway pass of every kind the scoring needs, before the first window: an actor's first
        window has come out a few float32 ulps off for some rows (docs/architecture.md, stage 2)."""
        row = np.arange(1, WARM_UP_TOKENS + 1, dtype=np.int64) % self.model.config.vocab_size
        rows = [
            {name: row[:length] for name in TOKEN_FIELDS} for length in (WARM_UP_TOKENS, WARM_UP_TOKENS // 2)
        ]
        score_batch(self.model, rows, self.passes, self.pad_token_id)

    def _maybe_die(self) -> None:
        """Fault injection for tests: the first actor to get here exits its process once."""
        if self.fail_once_marker and not os.path.exists(self.fail_once_marker):
            with open(self.fail_once_marker, "w") as fh:
                fh.write(f"scoring actor {os.getpid()} exited\n")
            os._exit(1)

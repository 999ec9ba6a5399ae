"""Batch scoring: a callable class Ray Data runs in an actor pool (one model per actor).

Each call gets a window of tokenised rows, sorts it by length, cuts it into sub-batches capped by
rows and padded tokens, runs the decoder without the LM head (no vocab-sized logits; with ``lm_loss``
only the scored tokens go through it) under ``inference_mode``, and returns one score record per row in
the window's order. With ``prompt_gain`` a second, reply-only pass gives ``nll_without_prompt``; with
``expert_effect`` a pass with every quality gate shut gives ``nll_gates_shut``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from selectmoe.models.loading import load_select_moe, resolve_dtype
from selectmoe.models.modeling import gates_forced
from selectmoe.scoring import layer_gate_means, layer_routing_means, row_nll, row_score, score_mask
from selectmoe.training.common import collate


class GateScorer:
    def __init__(
        self,
        model_path: str,
        *,
        pad_token_id: int,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        tokens: str = "assistant",
        max_rows: int = 32,
        max_tokens: int = 16384,
        store_routing: bool = False,
        lm_loss: bool = False,
        perplexity_weight: float = 0.0,
        prompt_gain: bool = False,
        prompt_gain_weight: float = 0.0,
        expert_effect: bool = False,
        expert_effect_weight: float = 0.0,
        fail_once_marker: str | None = None,
    ):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_select_moe(
            model_path, dtype=resolve_dtype(dtype, self.device), attn_implementation=attn_implementation
        ).to(self.device)
        self.model.eval()
        self.pad_token_id = pad_token_id
        self.tokens = tokens
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.store_routing = store_routing
        self.prompt_gain = prompt_gain or prompt_gain_weight != 0
        if self.prompt_gain and tokens != "assistant":
            raise ValueError("scoring.prompt_gain needs scoring.tokens=assistant (it compares reply tokens)")
        self.expert_effect = expert_effect or expert_effect_weight != 0
        self.lm_loss = lm_loss or perplexity_weight != 0 or self.prompt_gain or self.expert_effect
        self.perplexity_weight = perplexity_weight
        self.prompt_gain_weight = prompt_gain_weight
        self.expert_effect_weight = expert_effect_weight
        self.fail_once_marker = fail_once_marker

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._maybe_die()
        lengths = np.asarray([len(x) for x in batch["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        layer_scores = [None] * len(lengths)
        routing = [None] * len(lengths)
        n_scored = np.zeros(len(lengths), dtype=np.int64)
        nll = np.zeros(len(lengths), dtype=np.float64)
        nll_without_prompt = np.zeros(len(lengths), dtype=np.float64)
        nll_gates_shut = np.zeros(len(lengths), dtype=np.float64)
        for chunk in self._chunks(order, lengths):
            rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in chunk]
            tensors = collate(rows, self.pad_token_id, self.device)
            out = self.model.model(
                input_ids=tensors["input_ids"],
                attention_mask=tensors["attention_mask"],
                output_router_logits=True,
            )
            mask = score_mask(tensors["attention_mask"], tensors["labels"], self.tokens)
            records = out.router_logits
            means = layer_gate_means([r["quality_score"] for r in records], mask).cpu().numpy()
            if self.store_routing:
                dists = layer_routing_means([r["moe_logits"] for r in records], mask).cpu().numpy()
            counts = mask.sum(dim=1).cpu().numpy()
            if self.lm_loss:
                chunk_nll = (
                    row_nll(self.model, out.last_hidden_state, tensors["input_ids"], mask).cpu().numpy()
                )
            for j, i in enumerate(chunk):
                layer_scores[i] = means[j]
                n_scored[i] = counts[j]
                if self.lm_loss:
                    nll[i] = chunk_nll[j]
                if self.store_routing:
                    routing[i] = dists[j].reshape(-1)
            if self.prompt_gain:
                nll_without_prompt[chunk] = self._replies_alone_nll(batch, chunk)
            if self.expert_effect:
                with gates_forced(self.model, 0.0):
                    hidden = self.model.model(
                        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
                    ).last_hidden_state
                nll_gates_shut[chunk] = row_nll(self.model, hidden, tensors["input_ids"], mask).cpu().numpy()
        layers = np.stack(layer_scores)
        result = {
            "id": batch["id"],
            "dataset": batch["dataset"],
            "score": row_score(
                layers,
                nll,
                self.perplexity_weight,
                nll_without_prompt,
                self.prompt_gain_weight,
                nll_gates_shut,
                self.expert_effect_weight,
            ),
            "layer_scores": list(layers.astype(np.float64)),
            "n_tokens": np.asarray([len(x) for x in batch["input_ids"]], dtype=np.int64),
            "n_scored_tokens": n_scored,
        }
        if self.store_routing:
            result["routing"] = list(np.stack(routing).astype(np.float32))
        if self.lm_loss:
            result["nll"] = nll
        if self.prompt_gain:
            result["nll_without_prompt"] = nll_without_prompt
        if self.expert_effect:
            result["nll_gates_shut"] = nll_gates_shut
        return result

    def _replies_alone_nll(self, batch: dict[str, np.ndarray], chunk: list[int]) -> np.ndarray:
        """Mean NLL of each row's reply tokens with the prompts removed (``reply_input_ids``)."""
        rows = [{"input_ids": batch["reply_input_ids"][i], "labels": batch["reply_labels"][i]} for i in chunk]
        tensors = collate(rows, self.pad_token_id, self.device)
        hidden = self.model.model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).last_hidden_state
        mask = score_mask(tensors["attention_mask"], tensors["labels"], "assistant")
        return row_nll(self.model, hidden, tensors["input_ids"], mask).cpu().numpy()

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

    def _maybe_die(self) -> None:
        """Fault injection for tests: the first actor to get here exits its process once."""
        if self.fail_once_marker and not os.path.exists(self.fail_once_marker):
            with open(self.fail_once_marker, "w") as fh:
                fh.write(f"scoring actor {os.getpid()} exited\n")
            os._exit(1)

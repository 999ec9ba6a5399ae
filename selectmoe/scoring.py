"""Row scores from gate outputs: the one score formula.

    layer_score[l] = mean over the row's scored tokens of g[l, t],   g = sigmoid(quality_score)
    score          = mean over layers of layer_score[l]
                     - perplexity_weight x NLL                          (when set)
                     + prompt_gain_weight x (NLL_without_prompt - NLL)  (when set)
                     + expert_effect_weight x (NLL_gates_shut - NLL)    (when set)

Scored tokens are the assistant tokens (``labels != -100``) by default, or every real token with
``scoring.tokens=all``; padding never counts. ``layer_scores`` are stored beside ``score`` so any
other aggregation (last layers only, weighted layers) can be recomputed without rescoring. (The
seed had two formulas; a later script averaged sigmoid(token-mean q) instead. This is the first.)
``NLL`` is the row's mean next-token NLL over the same tokens, from the same forward pass
(``row_nll``): ``scoring.perplexity_weight`` ranks rows the model finds implausible lower.
``NLL_without_prompt`` is the mean NLL of the same reply tokens with the prompts removed (a second,
reply-only pass): the prompt gain is how much the prompt helps predict the reply (per-token pointwise
mutual information; the inverse view of IFD), low for replies that do not answer their prompt.
``NLL_gates_shut`` is the NLL of the same tokens with every quality gate forced to 0 (only the trash
expert; a third pass): the expert effect is what the gated experts contribute to predicting the row,
a score built from what the gate controls rather than from the gate's raw value.
"""

from __future__ import annotations

import numpy as np
import torch

SCORE_TOKENS = ("assistant", "all")


def score_mask(attention_mask: torch.Tensor, labels: torch.Tensor, tokens: str) -> torch.Tensor:
    """(B, T) bool: the tokens a row's score averages over."""
    if tokens not in SCORE_TOKENS:
        raise ValueError(f"scoring.tokens must be one of {SCORE_TOKENS}, got {tokens!r}")
    mask = attention_mask.bool()
    if tokens == "assistant":
        mask = mask & (labels != -100)
    return mask


def layer_gate_means(quality_scores: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, L): per layer, the mean gate value over each row's masked tokens."""
    gates = torch.sigmoid(torch.stack([q[..., 0].float() for q in quality_scores], dim=-1))  # (B, T, L)
    weights = mask.unsqueeze(-1).float()
    return (gates * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def layer_routing_means(moe_logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, L, E): per layer, the mean routing distribution over each row's masked tokens."""
    batch, seq = mask.shape
    probs = torch.stack([torch.softmax(x.float(), dim=-1).view(batch, seq, -1) for x in moe_logits], dim=2)
    weights = mask.float()[..., None, None]  # (B, T, 1, 1)
    return (probs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def row_score(
    layer_scores: np.ndarray,
    nll: np.ndarray | None = None,
    perplexity_weight: float = 0.0,
    nll_without_prompt: np.ndarray | None = None,
    prompt_gain_weight: float = 0.0,
    nll_gates_shut: np.ndarray | None = None,
    expert_effect_weight: float = 0.0,
) -> np.ndarray:
    """(B, L) -> (B,): the mean over layers, with the NLL, prompt-gain and expert-effect terms when their
    weights are set."""
    score = np.asarray(layer_scores, dtype=np.float64).mean(axis=-1)
    if perplexity_weight:
        score = score - perplexity_weight * np.asarray(nll, dtype=np.float64)
    if prompt_gain_weight:
        gain = np.asarray(nll_without_prompt, dtype=np.float64) - np.asarray(nll, dtype=np.float64)
        score = score + prompt_gain_weight * gain
    if expert_effect_weight:
        effect = np.asarray(nll_gates_shut, dtype=np.float64) - np.asarray(nll, dtype=np.float64)
        score = score + expert_effect_weight * effect
    return score


def row_score_tensor(quality_scores: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B,): the row score as a differentiable tensor (stage 1 trains it against a reference set)."""
    return layer_gate_means(quality_scores, mask).mean(dim=-1)


def row_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): mean next-token NLL over each row's masked tokens, from the decoder's last hidden state.

    Only the positions that predict a masked token go through the LM head, so no (B, T, vocab)
    logits are built. A baseline and an optional score term (``scoring.lm_loss``)."""
    targets = mask[:, 1:]  # token t+1 is predicted at position t
    rows = torch.nonzero(targets, as_tuple=True)[0]
    logits = model.lm_head(hidden[:, :-1][targets])  # (N, V)
    nll = torch.nn.functional.cross_entropy(logits.float(), input_ids[:, 1:][targets], reduction="none")
    total = torch.zeros(mask.shape[0], device=nll.device).index_add_(0, rows, nll)
    count = torch.zeros(mask.shape[0], device=nll.device).index_add_(0, rows, torch.ones_like(nll))
    return total / count.clamp(min=1)

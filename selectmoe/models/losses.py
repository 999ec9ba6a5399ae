"""Quality losses on the gate values ``g = sigmoid(quality_score)``.

Every loss maps ``(gates, mask, config) -> scalar``: ``gates`` is ``(B, T)`` in [0, 1], ``mask`` is a
``(B, T)`` bool tensor of the tokens that count (padding is never among them). All are differentiable
(the seed returned ``.item()`` constants for the two moment losses, so they trained nothing).

Averaging: ``masked_mean`` weighs every counted token equally, or with ``sample_wise_averaging`` every
row equally (tokens averaged within a row first). Moment losses use the same weighting for the mean and
the (population) variance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

QualityLoss = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, sample_wise: bool) -> torch.Tensor:
    """Mean of ``values`` (B, T) over ``mask``; rows without counted tokens are ignored."""
    weights = mask.to(values.dtype)
    if sample_wise:
        per_row_count = weights.sum(dim=-1)  # (B,)
        has_tokens = per_row_count > 0
        per_row = (values * weights).sum(dim=-1) / per_row_count.clamp(min=1)
        return (per_row * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def _moments(gates: torch.Tensor, mask: torch.Tensor, sample_wise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean = masked_mean(gates, mask, sample_wise)
    var = masked_mean((gates - mean) ** 2, mask, sample_wise)
    return mean, var


def sigmoid_loss(gates, mask, config):
    """Mean gate value: pushes every gate shut; only tokens whose experts help the LM stay open."""
    return masked_mean(gates, mask, config.sample_wise_averaging)


def mse_loss(gates, mask, config):
    """Mean squared distance of the gates from 0."""
    return masked_mean(gates**2, mask, config.sample_wise_averaging)


def beta_moment_matching_loss(gates, mask, config):
    """``w_mean (mean - m)^2 + w_var (var - v)^2`` towards a Beta with mean ``m`` and variance ``v``."""
    mean, var = _moments(gates, mask, config.sample_wise_averaging)
    return (
        config.w_mean * (mean - config.beta_target_mean) ** 2
        + config.w_var * (var - config.beta_target_var) ** 2
    )


def mean_variance_regularization_loss(gates, mask, config):
    """``(mean - 0.5)^2 - lambda_var * var``: centre the gates and reward their spread."""
    mean, var = _moments(gates, mask, config.sample_wise_averaging)
    return (mean - 0.5) ** 2 - config.lambda_var * var


QUALITY_LOSSES: dict[str, QualityLoss] = {
    "sigmoid": sigmoid_loss,
    "mse": mse_loss,
    "beta_moment_matching": beta_moment_matching_loss,
    "mean_variance_regularization": mean_variance_regularization_loss,
}


def register_quality_loss(name: str, fn: QualityLoss, overwrite: bool = False) -> None:
    """Make ``fn(gates, mask, config) -> scalar`` available as ``quality_loss_type=name``."""
    if name in QUALITY_LOSSES and not overwrite:
        raise ValueError(f"quality loss {name!r} is already registered; pass overwrite=True to replace it")
    QUALITY_LOSSES[name] = fn


def quality_loss(quality_scores: list[torch.Tensor], mask: torch.Tensor, config) -> torch.Tensor:
    """Mean over layers of the configured loss; ``quality_scores`` are per-layer raw gate logits (B, T, 1)."""
    name = config.quality_loss_type
    if name not in QUALITY_LOSSES:
        raise ValueError(f"unknown quality_loss_type {name!r}; registered: {sorted(QUALITY_LOSSES)}")
    fn = QUALITY_LOSSES[name]
    per_layer = [fn(torch.sigmoid(q.squeeze(-1).float()), mask, config) for q in quality_scores]
    loss = torch.stack(per_layer).mean()
    if config.quality_loss_debug:
        logger.info(
            "quality loss %s=%.6f per layer=%s", name, loss.item(), [round(x.item(), 6) for x in per_layer]
        )
    return loss

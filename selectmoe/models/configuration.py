"""``SelectMoeConfig``: OLMoE's config plus the seed project's quality-gate parameters."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import OlmoeConfig

TRASH_EXPERT_MODES = ("zero", "noise", "custom")
QUALITY_LOSS_TOKENS = ("all", "assistant")


@strict
class SelectMoeConfig(OlmoeConfig):
    r"""
    Select-MoE = OLMoE + a quality gate per layer: ``y = g * MoE(x) + (1 - g) * trash(x)``, ``g = sigmoid(q)``.

    Loss settings are read at forward time, so ``model.config.quality_loss_type = "mse"`` works after loading.

    quality_gate_init_mean / quality_gate_init_std: normal init of the new gate weights.
    quality_loss_weight: weight of the quality loss inside the router aux loss.
    trash_expert_mode: ``zero`` | ``noise`` (Gaussian with the expert output's per-token mean/std, fixed per
        position and layer so a row's result does not depend on its batch) | ``custom`` (the callable
        registered under ``custom_trash_expert`` with ``register_trash_expert``).
    enable_load_balancing: add OLMoE's load-balancing loss to the aux loss.
    quality_loss_type: ``sigmoid`` | ``mse`` | ``beta_moment_matching`` | ``mean_variance_regularization`` or a
        name registered with ``register_quality_loss``.
    beta_target_mean / beta_target_var / w_mean / w_var: beta moment matching targets and weights.
    lambda_var: variance reward of ``mean_variance_regularization``.
    sample_wise_averaging: average tokens within each row first, then rows (else all tokens equally).
    quality_loss_tokens: ``all`` non-padding tokens or only ``assistant`` tokens (labels not ``IGNORE_INDEX``).
    quality_loss_debug: log the quality loss terms at each forward.
    trash_noise_seed: seed of the fixed noise table of the ``noise`` trash expert.
    """

    model_type = "select_moe"

    output_router_logits: bool = True
    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = 0.02
    quality_loss_weight: float = 0.01
    trash_expert_mode: str = "zero"
    custom_trash_expert: str | None = None
    enable_load_balancing: bool = False
    quality_loss_type: str = "sigmoid"
    beta_target_mean: float = 0.5
    beta_target_var: float = 0.05
    w_mean: float = 1.0
    w_var: float = 1.0
    lambda_var: float = 0.1
    sample_wise_averaging: bool = False
    quality_loss_tokens: str = "all"
    quality_loss_debug: bool = False
    trash_noise_seed: int = 0

    def __post_init__(self, **kwargs):
        if self.trash_expert_mode not in TRASH_EXPERT_MODES:
            raise ValueError(
                f"trash_expert_mode must be one of {TRASH_EXPERT_MODES}, got {self.trash_expert_mode!r}"
            )
        if self.trash_expert_mode == "custom" and not self.custom_trash_expert:
            raise ValueError("trash_expert_mode='custom' needs custom_trash_expert=<registered name>")
        if self.quality_loss_tokens not in QUALITY_LOSS_TOKENS:
            raise ValueError(
                f"quality_loss_tokens must be one of {QUALITY_LOSS_TOKENS}, got {self.quality_loss_tokens!r}"
            )
        super().__post_init__(**kwargs)

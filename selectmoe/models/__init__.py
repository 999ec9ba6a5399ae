"""Select-MoE: OLMoE with a quality gate per layer."""

from selectmoe.models.configuration import SelectMoeConfig
from selectmoe.models.losses import QUALITY_LOSSES, register_quality_loss
from selectmoe.models.modeling import (
    SelectMoeForCausalLM,
    SelectMoeModel,
    SelectMoePreTrainedModel,
    register_trash_expert,
)
from selectmoe.models.registration import register_select_moe

__all__ = [
    "QUALITY_LOSSES",
    "SelectMoeConfig",
    "SelectMoeForCausalLM",
    "SelectMoeModel",
    "SelectMoePreTrainedModel",
    "register_quality_loss",
    "register_select_moe",
    "register_trash_expert",
]

register_select_moe()

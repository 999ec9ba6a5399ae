"""Registration with transformers' Auto classes and checkpoint conversion."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from selectmoe.models.configuration import SelectMoeConfig
from selectmoe.models.modeling import SelectMoeForCausalLM, SelectMoeModel

_registered = False


def register_select_moe() -> None:
    """Register ``select_moe`` for AutoConfig/AutoModel/AutoModelForCausalLM (idempotent).

    Also registers OLMoE's checkpoint conversion (published per-expert tensors -> fused 3-D experts)
    for Select-MoE, so hub OLMoE checkpoints load straight into ``SelectMoeForCausalLM``.
    """
    global _registered
    if _registered:
        return
    AutoConfig.register("select_moe", SelectMoeConfig, exist_ok=True)
    AutoModel.register(SelectMoeConfig, SelectMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(SelectMoeConfig, SelectMoeForCausalLM, exist_ok=True)
    olmoe_mapping = get_checkpoint_conversion_mapping("olmoe")
    if olmoe_mapping is not None:
        for key in ("select_moe", "SelectMoeForCausalLM", "SelectMoeModel"):
            register_checkpoint_conversion_mapping(
                key, get_checkpoint_conversion_mapping("olmoe"), overwrite=True
            )
    _registered = True

"""selectmoe: Select-MoE data selection on Ray.

The model API is imported lazily so that the CLI and the data layer start without loading torch.
"""

__all__ = ["SelectMoeConfig", "SelectMoeForCausalLM", "register_select_moe"]


def __getattr__(name: str):
    if name in __all__:
        from selectmoe import models

        return getattr(models, name)
    raise AttributeError(f"module 'selectmoe' has no attribute {name!r}")

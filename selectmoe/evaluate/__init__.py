"""Stage 4, ``selectmoe evaluate``: lm-eval on the target model + adapter, inside Ray tasks.

``driver.evaluate(cfg)`` runs lm-eval (hub tasks, or the offline ``tasks/*_local`` families) and
writes ``results.json`` + ``results.md`` (``results``).
"""

from selectmoe.lazy import lazy_attribute

__all__ = ["evaluate"]
__getattr__ = lazy_attribute(__name__, "evaluate", "selectmoe.evaluate.driver")

"""Stage 1, ``selectmoe pretrain``: train the quality gates (and MoE routers) on Ray Train.

``driver.pretrain(cfg)`` reads and tokenises the corpus, runs ``worker.train_router_per_worker`` on
every worker through the shared loop (``selectmoe.training``) and writes the trained router weights.
"""

from selectmoe.lazy import lazy_attribute

__all__ = ["pretrain"]
__getattr__ = lazy_attribute(__name__, "pretrain", "selectmoe.pretrain.driver")

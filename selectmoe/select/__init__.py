"""Stage 2, ``selectmoe select``: score every row on Ray Data, then select the best.

``driver.select(cfg)``: read + tokenise -> ``scorer.GateScorer`` actors, each running the one scoring
pass ``score.score_batch`` -> score files -> an exact streaming selection (``topk``) -> the selected
rows. ``score`` also holds the one score formula (``row_score``), which stage 1's probe and reference
loss use too.
"""

from selectmoe.lazy import lazy_attribute

__all__ = ["select"]
__getattr__ = lazy_attribute(__name__, "select", "selectmoe.select.driver")

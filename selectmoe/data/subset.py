"""``dataset.subset_ratio``: which rows a run keeps, decided per row from (seed, dataset, id).

A row is kept iff a hash of (seed, dataset, id) falls below the ratio, so the choice is the same
in every front end, in any read order and on any number of workers, and each source dataset
keeps about ``ratio`` of its rows (exactly in expectation, not in count).
"""

from __future__ import annotations

import hashlib


def in_subset(seed: int, dataset: str, row_id: str, ratio: float) -> bool:
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{dataset}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2**64

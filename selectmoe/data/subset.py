"""``dataset.subset_ratio``: which rows a run keeps, decided per row from (seed, dataset, id).

A row is kept iff a hash of (seed, dataset, id) falls below the ratio, so the choice is the same
in every front end, in any read order and on any number of workers, and each source dataset
keeps about ``ratio`` of its rows (exactly in expectation, not in count). ``random_key`` is the same
kind of seeded per-row key, for seeded orders and samples (random selection, probe rows, mixing).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa


def in_subset(seed: int, dataset: str, row_id: str, ratio: float) -> bool:
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{dataset}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2**64


def random_key(seed: int, ids: pa.Array) -> pa.Array:
    """A seeded uniform key in [0, 1) per id: independent of order and of the other rows."""
    values = [
        int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64
        for i in ids.to_pylist()
    ]
    return pa.array(values, type=pa.float64())

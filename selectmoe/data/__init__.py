"""The data layer: readers, normalisation + validation, rejects, the one chat template, collate.

Nothing here imports Ray; ``selectmoe.ray_data.read_rows`` is the Ray Data front end over the same
pieces. ``collate`` (``selectmoe.data.collate``) is not re-exported here: it needs torch, the rest
does not.
"""

from __future__ import annotations

from selectmoe.data.ledger import RowLedger
from selectmoe.data.normalize import content_id, normalize_record
from selectmoe.data.readers import Piece, Source, read_records, resolve_sources
from selectmoe.data.rejects import REASONS, DataError, RowError, write_rejects
from selectmoe.data.rows import iter_rows, scan_piece
from selectmoe.data.subset import in_subset
from selectmoe.data.template import (
    IGNORE_INDEX,
    encode_batch,
    encode_messages,
    encode_replies_alone,
    ensure_pad_token,
    format_messages,
    load_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "REASONS",
    "DataError",
    "RowError",
    "Piece",
    "RowLedger",
    "Source",
    "content_id",
    "encode_batch",
    "encode_replies_alone",
    "encode_messages",
    "ensure_pad_token",
    "format_messages",
    "in_subset",
    "iter_rows",
    "load_tokenizer",
    "normalize_record",
    "read_records",
    "resolve_sources",
    "scan_piece",
    "write_rejects",
]

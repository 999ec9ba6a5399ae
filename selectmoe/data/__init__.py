"""The data layer: readers, normalisation + validation, the one chat template, the demo corpus.

Nothing here imports Ray; ``selectmoe.ray_data.read_rows`` is the Ray Data front end over the same
pieces.
"""

from __future__ import annotations

from selectmoe.data.defects import DEFECT_KINDS, cot_wrong_answer, plant_defects
from selectmoe.data.ledger import RowLedger
from selectmoe.data.normalize import content_id, normalize_record
from selectmoe.data.readers import Source, read_records, resolve_sources
from selectmoe.data.rejects import REASONS, DataError, RowError, write_rejects
from selectmoe.data.rows import iter_rows, scan_source
from selectmoe.data.subset import in_subset
from selectmoe.data.synthetic import write_demo_corpus
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
    "DEFECT_KINDS",
    "IGNORE_INDEX",
    "REASONS",
    "DataError",
    "RowError",
    "RowLedger",
    "Source",
    "content_id",
    "cot_wrong_answer",
    "encode_batch",
    "encode_replies_alone",
    "encode_messages",
    "ensure_pad_token",
    "format_messages",
    "in_subset",
    "iter_rows",
    "load_tokenizer",
    "normalize_record",
    "plant_defects",
    "read_records",
    "resolve_sources",
    "scan_source",
    "write_demo_corpus",
    "write_rejects",
]

"""From files to normalised rows: the scan both front ends run, and the plain-Python front end.

``scan_piece`` reads one file (or a piece of it), normalises each record and (given a tokenizer) checks that the
template keeps an assistant token within ``max_sequence_length``; it yields each record as a row or
a reject. ``iter_rows`` chains the scans of every input in source order through a ``RowLedger``.
``selectmoe.ray_data.read_rows`` runs the same scan in Ray tasks, one per piece.

A normalised row is ``{"dataset", "id", "messages", "extra", "source", "line"}``: the LESS row,
the original row's other fields as a JSON string (``extra``), and where it was read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from selectmoe.data.ledger import RowLedger
from selectmoe.data.normalize import normalize_record
from selectmoe.data.readers import Piece, RawRecord, Source, raw_text, read_records, resolve_sources
from selectmoe.data.rejects import MAX_RAW_CHARS, RowError, reject_record
from selectmoe.data.template import encode_batch

ENCODE_BATCH_ROWS = 256


class Scanned(NamedTuple):
    row: dict | None  # the normalised row, or None when rejected
    reject: dict | None
    raw: str | None  # the raw text (capped), for a duplicate-id reject found later
    n_tokens: int | None = None  # template length before truncation (with a tokenizer)
    truncated: bool = False
    encoded: dict | None = None  # ``encode_batch``'s result for the row (``keep_tokens``)


def scan_piece(
    piece: Piece,
    *,
    tokenizer=None,
    max_seq_length: int = 2048,
    keep_tokens: bool = False,
    loss_on: str = "assistant",
) -> Iterator[Scanned]:
    """Every record of one file's piece (``Piece(source)``: the whole file) as a row or a reject, in
    line order; ``keep_tokens``: each row keeps the encoding its check made (``Scanned.encoded``, its
    labels as ``loss_on`` says; which rows are rejected does not depend on it)."""
    source = piece.source
    pending: list[Scanned] = []
    for record in read_records(source.uri, piece):
        pending.append(_normalise(source, record))
        if len(pending) >= ENCODE_BATCH_ROWS:
            yield from _check_tokens(pending, tokenizer, max_seq_length, keep_tokens, loss_on)
            pending = []
    yield from _check_tokens(pending, tokenizer, max_seq_length, keep_tokens, loss_on)


def iter_rows(dataset_cfg, ledger: RowLedger, *, tokenizer=None) -> Iterator[dict]:
    """The rows a stage uses (accepted, de-duplicated, in the subset), streamed in source order.

    Rejects, duplicates and counts land in ``ledger`` (read them once the iterator is exhausted).
    """
    for source in resolve_sources(dataset_cfg):
        scanned = scan_piece(
            Piece(source), tokenizer=tokenizer, max_seq_length=dataset_cfg.max_sequence_length
        )
        for item in scanned:
            if item.reject is not None:
                ledger.reject(item.reject)
            elif admit(ledger, item):
                yield item.row


def admit(ledger: RowLedger, item: Scanned) -> bool:
    row = item.row
    return ledger.admit(
        dataset=row["dataset"],
        row_id=row["id"],
        source=row["source"],
        line=row["line"],
        raw=item.raw,
        n_tokens=item.n_tokens,
        truncated=item.truncated,
    )


def _normalise(source: Source, record: RawRecord) -> Scanned:
    raw = raw_text(record)[:MAX_RAW_CHARS]
    if record.error is not None:
        return Scanned(None, reject_record(source.uri, record.line, record.error, raw), raw)
    try:
        row = normalize_record(record.value, source.dataset)
    except RowError as err:
        return Scanned(None, reject_record(source.uri, record.line, err, raw), raw)
    row["source"] = source.uri
    row["line"] = record.line
    return Scanned(row, None, raw)


def _check_tokens(
    items: list[Scanned], tokenizer, max_seq_length: int, keep: bool, loss_on: str
) -> list[Scanned]:
    if tokenizer is None:
        return items
    messages = [item.row["messages"] for item in items if item.row is not None]
    encoded = iter(encode_batch(messages, tokenizer, max_seq_length=max_seq_length, loss_on=loss_on))
    checked = []
    for item in items:
        if item.row is None:
            checked.append(item)
            continue
        result = next(encoded)
        if isinstance(result, RowError):
            reject = reject_record(item.row["source"], item.row["line"], result, item.raw)
            checked.append(Scanned(None, reject, item.raw))
        else:
            before = result["n_tokens_before_truncation"]
            checked.append(
                item._replace(
                    n_tokens=before, truncated=before > result["n_tokens"], encoded=result if keep else None
                )
            )
    return checked

"""Why a row was rejected: reason codes, the reject record, and the two errors behind them.

A reject record is ``{"source", "line", "reason", "raw"}``: the file (path or URI), the 1-based line
(JSON-lines) or row number (Parquet, JSON arrays), ``"<code>: <detail>"`` and the raw text cut to
``MAX_RAW_CHARS``. The codes are stable; the detail names the field when one is at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MAX_RAW_CHARS = 2000

# code -> what it means (the manifest counts rejects by code)
REASONS = {
    "unreadable_file": "the file could not be opened, or broke off while reading (corrupt gzip/Parquet)",
    "bad_encoding": "bytes that are not UTF-8",
    "bad_json": "a line (or .json file) that is not valid JSON",
    "bad_type": "a field of the wrong type (the row itself not an object, content not a string, ...)",
    "unknown_schema": "none of messages / conversations / instruction+output / prompt+completion",
    "bad_role": "a role other than system/user/assistant (ShareGPT: human/gpt/user/assistant/system)",
    "bad_turn_order": "system not first, user/assistant not alternating, or the last turn not assistant",
    "no_assistant_turn": "no assistant message at all",
    "empty_content": "a message whose content is empty or whitespace",
    "duplicate_id": "an id seen before (the first in source order, then line, wins)",
    "no_assistant_tokens_after_truncation": "max_sequence_length cuts off every assistant token",
}


class DataError(ValueError):
    """Inputs that cannot be used: no such file, or a bad row under ``data.on_bad_row=error``."""


class RowError(ValueError):
    """One row that cannot be read or normalised; ``reason`` is a code of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def reject_record(source: str, line: int, error: RowError, raw: str | None) -> dict:
    """``raw=None``: not at hand yet (the Ray front end fills duplicates' raw text in afterwards)."""
    return {
        "source": source,
        "line": line,
        "reason": str(error),
        "raw": None if raw is None else raw[:MAX_RAW_CHARS],
    }


def reason_code(reject: dict) -> str:
    return reject["reason"].split(":", 1)[0]


def reject_error(reject: dict) -> DataError:
    """The ``on_bad_row=error`` exception: file, line and the reason (which names the field)."""
    return DataError(
        f"{reject['source']}, line {reject['line']}: {reject['reason']} "
        "(set data.on_bad_row=skip to write such rows to rejects.jsonl instead)"
    )


def write_rejects(path: str | Path, rejects: Iterable[dict]) -> int:
    """Write reject records as JSON lines; returns how many."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for reject in rejects:
            fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
            count += 1
    return count

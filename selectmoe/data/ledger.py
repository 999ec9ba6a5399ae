"""The books of a read: every row read is accepted or rejected, and the counts say so.

Both front ends (``iter_rows`` here, ``selectmoe.ray_data.read_rows``) feed rows in source order
into one ``RowLedger``, which applies ``data.on_bad_row``, rejects later duplicates of an id,
decides the ``subset_ratio`` sample and counts. ``rows_read == rows_accepted + rows_rejected``
holds by construction; ``rows_sampled`` (<= ``rows_accepted``) is what the stage goes on with.

Memory (``iter_rows``): one entry per accepted id (to find duplicates) plus the reject records (raw
text capped at 2000 characters each) and a histogram of token lengths. The Ray front end finds
duplicates in its workers and only adds up their per-piece counts here (``add_counts``,
``take_back``, ``count_rejects``): no per-row entry, and its reject records stay in Ray's object
store until ``write_rejects`` has a Ray task stream them into the file, one piece at a time
(``stream_rejects_from``), so they never pass through the driver.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from selectmoe.data.rejects import RowError, reason_code, reject_error, reject_record, write_rejects
from selectmoe.data.subset import in_subset

ON_BAD_ROW = ("skip", "error")


class RowLedger:
    def __init__(self, *, on_bad_row: str = "skip", subset_ratio: float = 1.0, seed: int = 0):
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"data.on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.subset_ratio = subset_ratio
        self.seed = seed
        self._rejects: list[dict] = []
        self._reject_stream: Callable[[], Iterable[dict]] | None = None
        self._reject_writer: Callable[[Path], int] | None = None
        self._rejected_by_reason: Counter[str] = Counter()
        self._rejected_by_source: Counter[str] = Counter()
        self._sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self._first_seen: dict[str, tuple[int, int]] = {}  # id -> (source index, line)
        self._accepted: Counter[str] = Counter()
        self._sampled: Counter[str] = Counter()
        self._token_lengths: Counter[int] = Counter()  # length -> rows
        self._truncated = 0

    @classmethod
    def from_config(cls, dataset_cfg, data_cfg, seed: int) -> RowLedger:
        return cls(on_bad_row=data_cfg.on_bad_row, subset_ratio=dataset_cfg.subset_ratio, seed=seed)

    def reject(self, reject: dict) -> None:
        """Record a reject; under ``on_bad_row=error`` raise ``DataError`` naming file and line."""
        if self.on_bad_row == "error":
            raise reject_error(reject)
        self._rejects.append(reject)
        self.count_rejects(Counter([reason_code(reject)]), reject["source"])

    def count_rejects(self, by_reason: Counter, source: str) -> None:
        """Rejects of ``source`` whose records someone else holds (see ``stream_rejects_from``)."""
        self._rejected_by_reason.update(by_reason)
        self._rejected_by_source[source] += sum(by_reason.values())

    def stream_rejects_from(
        self, records: Callable[[], Iterable[dict]], writer: Callable[[Path], int] | None = None
    ) -> None:
        """Where the counted rejects' records come from, in source order: a function that streams them
        (the Ray front end's, from the object store), and the ``writer`` that writes them to a path
        itself (the Ray front end's: a task, so that they do not pass through this process)."""
        self._reject_stream = records
        self._reject_writer = writer

    def rejected(self) -> Iterator[dict]:
        """The reject records, in source order."""
        yield from self._rejects
        if self._reject_stream is not None:
            yield from self._reject_stream()

    def admit(
        self,
        *,
        dataset: str,
        row_id: str,
        source: str,
        line: int,
        raw: str | None,
        n_tokens: int | None = None,
        truncated: bool = False,
    ) -> bool:
        """A row that normalised (and tokenised): True when the stage should use it.

        False for a duplicate id (rejected here, with ``raw`` as its raw text) or a row outside the
        ``subset_ratio`` sample. ``n_tokens`` is the length before truncation.
        """
        first = self._first_seen.get(row_id)
        if first is not None:
            self.reject(duplicate_reject(row_id, source, line, self._sources[first[0]], first[1], raw))
            return False
        self._first_seen[row_id] = (self._index(source), line)
        self._accepted[dataset] += 1
        if n_tokens is not None:
            self._token_lengths[n_tokens] += 1
            self._truncated += int(truncated)
        if not in_subset(self.seed, dataset, row_id, self.subset_ratio):
            return False
        self._sampled[dataset] += 1
        return True

    def add_counts(self, accepted: Counter, sampled: Counter, token_lengths: Counter, truncated: int) -> None:
        """Rows some worker accepted (duplicates included: see ``take_back``)."""
        self._accepted.update(accepted)
        self._sampled.update(sampled)
        self._token_lengths.update(token_lengths)
        self._truncated += truncated

    def take_back(self, row: dict, source: str) -> None:
        """Take back a row of ``source`` that ``add_counts`` counted and whose id came earlier: a
        ``duplicate_id`` reject (its record comes from ``stream_rejects_from``). ``row``: dataset,
        n_tokens, truncated, sampled."""
        self.count_rejects(Counter(["duplicate_id"]), source)
        self._accepted[row["dataset"]] -= 1
        self._sampled[row["dataset"]] -= int(row["sampled"])
        if row["n_tokens"] is not None:
            self._token_lengths[row["n_tokens"]] -= 1
            self._truncated -= int(row["truncated"])

    def write_rejects(self, path: str | Path) -> int:
        """``rejects.jsonl``: one reject record per line, in source order; returns how many."""
        if self._reject_writer is not None and not self._rejects:
            return self._reject_writer(Path(path))
        return write_rejects(path, self.rejected())

    def counts(self) -> dict:
        accepted, rejected = sum(self._accepted.values()), sum(self._rejected_by_reason.values())
        counts = {
            "rows_read": accepted + rejected,
            "rows_accepted": accepted,
            "rows_rejected": rejected,
            "rows_sampled": sum(self._sampled.values()),
        }
        if +self._token_lengths:
            counts["rows_truncated"] = self._truncated
        counts["datasets"] = {
            name: {"rows_accepted": self._accepted[name], "rows_sampled": self._sampled[name]}
            for name in sorted(self._accepted)
        }
        counts["rejected_by_reason"] = dict(sorted((+self._rejected_by_reason).items()))
        counts["rejected_by_source"] = dict(sorted((+self._rejected_by_source).items()))
        return counts

    def token_length_stats(self) -> dict[str, float]:
        """Percentiles of accepted rows' token lengths before truncation; {} without a tokenizer."""
        histogram = +self._token_lengths
        if not histogram:
            return {}
        values = np.array(sorted(histogram), dtype=np.int64)
        ends = np.cumsum([histogram[v] for v in values])  # rank of the last row of each length, + 1
        rows = int(ends[-1])

        def percentile(p: float) -> float:  # numpy's default (linear) on the rows sorted
            position = (rows - 1) * p / 100
            low = int(np.floor(position))
            below, above = values[np.searchsorted(ends, [low, min(low + 1, rows - 1)], side="right")]
            return float(below + (above - below) * (position - low))

        return {
            "p50": percentile(50),
            "p90": percentile(90),
            "p99": percentile(99),
            "max": int(values[-1]),
            "mean": round(float((values * np.diff(ends, prepend=0)).sum() / rows), 2),
        }

    def _index(self, source: str) -> int:
        index = self._source_index.get(source)
        if index is None:
            index = self._source_index[source] = len(self._sources)
            self._sources.append(source)
        return index


def duplicate_reject(
    row_id: str, source: str, line: int, first_source: str, first_line: int, raw: str | None
) -> dict:
    detail = f"id {row_id!r} first seen in {first_source}, line {first_line}"
    return reject_record(source, line, RowError("duplicate_id", detail), raw)

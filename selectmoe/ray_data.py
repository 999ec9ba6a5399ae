"""Ray Data front end of the data layer: normalised rows as a ``ray.data.Dataset``.

Built on the same pieces as ``selectmoe.data.iter_rows`` (``scan_piece``, one ``RowLedger``), so
the rows, line numbers, ids, rejects and counts are the same. Files larger than ``data.split_bytes``
are read in pieces (byte ranges of JSON lines, row groups of Parquet; ``data.readers``), sized so
that a corpus of few large files still gives every CPU of the cluster reads (at least two pieces a
CPU, none under ``MIN_PIECE_BYTES``). ``read_rows`` makes two passes, one Ray task per piece in each:

1. a scan (Ray tasks): each task normalises (and, given a tokenizer, checks) its piece and returns
   its rejects, its counts (per dataset, in the sample, a histogram of token lengths) and its rows'
   ids cut into hash buckets; one task per bucket then finds the ids seen twice (the first by
   (file, line) wins, as in ``iter_rows``). The driver adds up counts and keeps the duplicates, never
   a per-row entry: each piece's reject line numbers stay in the object store (the lines its reads
   drop, one array per piece, which each read task fetches for itself), and so do the reject records
   until ``RowLedger.write_rejects`` has a Ray task on the driver's node stream them into the file in
   source order, one piece at a time, with the duplicates' raw text read back from their pieces (Ray
   keeps a piece's small objects, under ~100 KiB, in the driver's own memory store: at most that much
   a piece). ``on_bad_row`` applies before any expensive stage work;
2. the returned lazy ``Dataset``: the pieces read again, each dropping its own rejected lines and
   rows outside the ``subset_ratio`` sample. It streams (memory follows the block, not the corpus)
   and can be executed any number of times.

Given ``rows_dir``, the scan also writes each piece's accepted rows in the subset there
(``part-<piece>.parquet``, source order by name) and the parts holding a later duplicate are then
rewritten without it; the returned datasets then read those parts, not the text, for as long as the
folder is there: ``validate-data`` and stages 1-3 read the text once. With ``tokens`` the parts also
hold the token columns the scan's template check computed (``token_schema``: what ``tokenize_rows``
adds), so stages 1-3 tokenise once too (stages 1 and 3 through ``read_tokenized``).

``tokenize_rows`` maps those rows through the one chat template (``input_ids``, ``labels``).

Tasks take one CPU each and no actor pool is created, so on a 2-CPU laptop nothing starves.
Local use: ``ray.init()`` first (or let Ray Data start a local cluster); on a cluster the workers
must reach the input URIs.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from selectmoe.data.ledger import RowLedger, duplicate_reject
from selectmoe.data.readers import (
    Piece,
    Source,
    count_newlines,
    file_size,
    newline_ranges,
    raw_texts,
    resolve_sources,
    split_source,
    with_lines_before,
)
from selectmoe.data.rejects import MAX_RAW_CHARS, DataError, RowError, reason_code, write_rejects
from selectmoe.data.rows import scan_piece
from selectmoe.data.subset import in_subset, random_key
from selectmoe.data.template import encode_batch, encode_replies_alone, load_tokenizer
from selectmoe.layout import ROWS_SCRATCH, TRAINING_ROWS_SCRATCH, TRUSTED_ROWS_SCRATCH
from selectmoe.scaling import ensure_ray

OUTPUT_ROWS = 1024  # rows per table a read task yields
MIN_PIECE_BYTES = 8 << 20  # pieces made smaller to give every CPU reads stay at least this big
# the read's own Ray tasks: one CPU each, spread over the nodes, and outside any placement group the
# caller runs in (a Tune trial's captures its children's tasks, and its bundles hold no free CPU)
READ_TASK = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
TOKENIZE_BATCH_ROWS = 256

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROW_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("id", pa.string()),
        ("messages", MESSAGE_TYPE),
        ("extra", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
    ]
)


_TOKEN_ID_FIELDS = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
_TOKEN_COUNT_FIELDS = [("n_tokens", pa.int64()), ("n_assistant_tokens", pa.int64())]
_REPLY_FIELDS = [("reply_input_ids", pa.list_(pa.int32())), ("reply_labels", pa.list_(pa.int32()))]


def token_schema(replies_alone: bool = False) -> pa.Schema:
    """The columns ``tokenize_rows`` adds to the rows (and ``read_rows(tokens=True)`` writes)."""
    return pa.schema(_TOKEN_ID_FIELDS + _TOKEN_COUNT_FIELDS + (_REPLY_FIELDS if replies_alone else []))


@dataclass
class RowsRead:
    # accepted rows in the subset, source order: ``ROW_SCHEMA`` (``read_tokenized``: its token columns)
    rows: ray.data.Dataset
    ledger: RowLedger  # counts(), rejects, token_length_stats()
    sources: list[Source]
    outside_subset: Callable[..., ray.data.Dataset]  # ``(ids=None, key_below=1.0)``: see ``_outside``
    rows_not_done: Callable[..., RowsLeft]  # ``(done, columns=None)``: see ``_rows_not_done``


@dataclass
class RowsLeft:
    rows: ray.data.Dataset | None  # the rows in the subset not done before, source order; None: none
    rows_done: int
    pieces_skipped: int  # pieces all of whose rows were done: not read again
    pieces: int


@dataclass
class _Plan:
    """What the scan learnt about each piece: the lines its second read drops (rejects,
    duplicates), its rows in the subset, and the line of its last row (-1: it has none); and where it
    wrote the rows in the subset (``read_rows(rows_dir=)``), if it did."""

    pieces: list[Piece]
    dropped: list  # per piece, an ObjectRef: the sorted int64 lines its reads of the text drop
    in_subset: np.ndarray
    last_row_line: np.ndarray
    rows_dir: Path | None


def _outside(pieces, data_cfg, dropped, seed: int, subset_ratio: float, *, ids=None, key_below: float = 1.0):
    """The accepted, de-duplicated rows ``dataset.subset_ratio`` left out (rows a stage does not train
    on), read again by one task per piece, never through the driver: those of ``ids`` (an Arrow array),
    or a seeded sample, ``random_key(seed, id) < key_below``."""
    return _per_piece(
        pieces,
        data_cfg,
        _accepted_rows,
        scan_dropped=dropped,
        seed=seed,
        subset_ratio=subset_ratio,
        outside=True,
        ids=None if ids is None else ray.put(ids),
        key_below=key_below,
    )


def read_rows(
    dataset_cfg,
    data_cfg,
    *,
    seed: int = 0,
    tokenizer_name: str | None = None,
    rows_dir: Path | None = None,
    tokens: bool = False,
    replies_alone: bool = False,
    loss_on: str = "assistant",
) -> RowsRead:
    """Scan the inputs of ``dataset_cfg`` (pass 1) and return the lazy dataset of accepted rows.

    With ``tokenizer_name`` the scan also checks the template against
    ``dataset.max_sequence_length`` and records token lengths for the percentiles. With ``rows_dir`` (an
    empty folder the workers reach) the scan also writes the rows there as Parquet parts, and the
    returned datasets read those parts instead of the text; with ``tokens`` (and a tokenizer) the parts
    also hold the scan's encodings, ``token_schema(replies_alone)``: the columns ``tokenize_rows`` would
    add with ``loss_on`` (``rows_not_done(done, columns=...)`` reads them).
    """
    if tokens and (tokenizer_name is None or rows_dir is None):
        raise ValueError("read_rows(tokens=True) needs tokenizer_name and rows_dir")
    sources = resolve_sources(dataset_cfg)  # before Ray starts: a missing input fails at once
    ensure_ray()
    ledger = RowLedger.from_config(dataset_cfg, data_cfg, seed)
    pieces = plan_pieces(sources, data_cfg.split_bytes)
    plan = _scan(
        pieces,
        ledger,
        data_cfg,
        dataset_cfg,
        seed,
        tokenizer_name,
        rows_dir,
        tokens=tokens,
        replies_alone=replies_alone,
        loss_on=loss_on,
    )
    if rows_dir is None:
        rows = _per_piece(
            pieces,
            data_cfg,
            _accepted_rows,
            scan_dropped=plan.dropped,
            seed=seed,
            subset_ratio=dataset_cfg.subset_ratio,
        )
    else:
        rows = _rows_not_done(plan, data_cfg, seed, dataset_cfg.subset_ratio, lambda: iter(())).rows
        rows = rows if rows is not None else ray.data.from_arrow(ROW_SCHEMA.empty_table())
    outside = functools.partial(_outside, pieces, data_cfg, plan.dropped, seed, dataset_cfg.subset_ratio)
    not_done = functools.partial(_rows_not_done, plan, data_cfg, seed, dataset_cfg.subset_ratio)
    return RowsRead(rows=rows, ledger=ledger, sources=sources, outside_subset=outside, rows_not_done=not_done)


def _rows_not_done(
    plan: _Plan,
    data_cfg,
    seed: int,
    subset_ratio: float,
    done: Callable[[], Iterator[pa.Table]],
    columns: list[str] | None = None,
) -> RowsLeft:
    """The rows in the subset that are not among ``done`` (a callable streaming tables with ``source``
    and ``line``: the rows a resumed stage finished before), without holding the done rows: a pass over
    them counts each piece's done rows; pieces whose rows are all done are not read again, and a second
    pass (only when some piece is done in part) collects the lines of those pieces, which their read
    tasks then drop. Driver memory: O(pieces), plus the lines of the pieces done in part (those in
    flight when the earlier run stopped). The rows come from the parts the scan wrote when it wrote
    them (``columns`` of them; default ``ROW_SCHEMA``'s), else from the text again."""
    if columns is not None and plan.rows_dir is None:
        raise ValueError("columns= reads the parts the scan wrote: read_rows(rows_dir=...)")
    owners = _line_owners(plan)
    done_per_piece = np.zeros(len(plan.pieces), dtype=np.int64)
    for table in done():
        for index, _ in _owned_lines(table, owners):
            done_per_piece += np.bincount(index, minlength=len(plan.pieces))
    over = np.flatnonzero(done_per_piece > plan.in_subset)
    if len(over):
        piece = plan.pieces[over[0]]
        raise DataError(
            f"{piece.source.uri}: {done_per_piece[over[0]]} rows done before in bytes/row groups "
            f"[{piece.start}, {piece.end}), which hold {plan.in_subset[over[0]]} rows of the subset: the "
            "rows done before were written more than once, or for other inputs"
        )
    partly = set(np.flatnonzero((done_per_piece > 0) & (done_per_piece < plan.in_subset)).tolist())
    done_lines: dict[int, list[int]] = {index: [] for index in partly}
    if partly:
        for table in done():
            for index, lines in _owned_lines(table, owners):
                for piece in partly.intersection(np.unique(index).tolist()):
                    done_lines[piece].extend(lines[index == piece].tolist())
    left = [index for index in range(len(plan.pieces)) if done_per_piece[index] < plan.in_subset[index]]
    rows = None
    if left and plan.rows_dir is not None:
        rows = _per_piece(
            [plan.pieces[index] for index in left],
            data_cfg,
            _written_rows,
            dropped=[sorted(done_lines.get(index, [])) for index in left],
            indices=left,
            rows_dir=str(plan.rows_dir),
            columns=columns or ROW_SCHEMA.names,
        )
    elif left:
        rows = _per_piece(
            [plan.pieces[index] for index in left],
            data_cfg,
            _accepted_rows,
            dropped=[sorted(done_lines.get(index, [])) for index in left],
            indices=left,
            scan_dropped=plan.dropped,
            seed=seed,
            subset_ratio=subset_ratio,
        )
    skipped = int(np.count_nonzero(plan.in_subset > 0)) - len(left)
    return RowsLeft(rows, int(done_per_piece.sum()), skipped, len(plan.pieces))


def _line_owners(plan: _Plan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per source: the last row lines of its pieces with rows (ascending) and those pieces' indices;
    a row's piece is the first whose last row line is at or after the row's line."""
    owners: dict[str, tuple[list, list]] = {}
    for index, (piece, last) in enumerate(zip(plan.pieces, plan.last_row_line, strict=True)):
        if last >= 0:
            lasts, indices = owners.setdefault(piece.source.uri, ([], []))
            lasts.append(last)
            indices.append(index)
    return {uri: (np.asarray(lasts), np.asarray(indices)) for uri, (lasts, indices) in owners.items()}


def _owned_lines(table: pa.Table, owners: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per source in ``table``: (the piece index of each of its rows, their lines)."""
    sources = pc.dictionary_encode(table["source"]).combine_chunks()
    codes = sources.indices.to_numpy(zero_copy_only=False)
    lines = table["line"].to_numpy()
    for code, uri in enumerate(sources.dictionary.to_pylist()):
        mine = lines[codes == code]
        lasts, indices = owners.get(uri, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        position = np.searchsorted(lasts, mine, side="left")
        if (position >= len(lasts)).any():
            raise DataError(
                f"{uri}: rows done before are at lines past its last row (done for other inputs?)"
            )
        yield indices[position], mine


def plan_pieces(sources: list[Source], split_bytes: int) -> list[Piece]:
    """The pieces the read tasks take, in source order, line numbers known (``data.readers``)."""
    if split_bytes <= 0:
        return [Piece(source) for source in sources]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    total = sum(file_size(source.uri) for source in sources)
    piece_bytes = min(split_bytes, max(MIN_PIECE_BYTES, -(-total // (2 * cpus))))
    pieces = [piece for source in sources for piece in split_source(source, piece_bytes)]
    counting = newline_ranges(pieces)
    if not counting:
        return pieces
    count = ray.remote(count_newlines).options(**READ_TASK)
    return with_lines_before(pieces, ray.get([count.remote(piece) for piece in counting]))


def _per_piece(
    pieces: list[Piece],
    data_cfg,
    fn,
    dropped: list[list[int]] | None = None,
    indices: list[int] | None = None,
    **fn_kwargs,
) -> ray.data.Dataset:
    """One task per piece running ``fn`` (each told its own ``dropped`` lines, default none, and its
    index in the scan's plan: ``indices``, default their order); output kept in source order
    (deterministic)."""
    dropped = dropped if dropped is not None else [[]] * len(pieces)
    items = [
        {
            "index": index,
            "uri": piece.source.uri,
            "dataset": piece.source.dataset,
            "start": piece.start,
            "end": -1 if piece.end is None else piece.end,
            "lines_before": piece.lines_before,
            "dropped": json.dumps(lines),
        }
        for index, piece, lines in zip(indices or range(len(pieces)), pieces, dropped, strict=True)
    ]
    concurrency = data_cfg.read_parallelism if data_cfg.read_parallelism > 0 else None
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs, concurrency=concurrency
    )
    dataset.context.execution_options.preserve_order = True
    return dataset


def _piece_of(batch: pa.Table) -> Piece:
    item = batch.slice(0, 1).to_pylist()[0]
    return Piece(
        Source(item["uri"], item["dataset"]),
        start=item["start"],
        end=None if item["end"] < 0 else item["end"],
        lines_before=item["lines_before"],
    )


def _scan(
    pieces: list[Piece],
    ledger: RowLedger,
    data_cfg,
    dataset_cfg,
    seed: int,
    tokenizer_name,
    rows_dir,
    *,
    tokens: bool,
    replies_alone: bool,
    loss_on: str,
) -> _Plan:
    """Pass 1 into ``ledger``; returns, per piece, the lines its second read must drop (its rejects, some
    of which a read without the tokenizer would not see, and its duplicates), its rows in the subset and
    the line of its last row. With ``rows_dir``: the rows written there (with ``tokens``, their token
    columns, the replies alone too with ``replies_alone``), duplicates removed."""
    buckets = hash_buckets()
    scan = ray.remote(_scan_piece).options(num_returns=3 + buckets, **READ_TASK)
    kwargs = {
        "tokenizer_name": tokenizer_name,
        "max_seq_length": dataset_cfg.max_sequence_length,
        "seed": seed,
        "subset_ratio": dataset_cfg.subset_ratio,
        "buckets": buckets,
        "rows_dir": None if rows_dir is None else str(rows_dir),
        "tokens": tokens,
        "replies_alone": replies_alone,
        "loss_on": loss_on,
    }
    limit = data_cfg.read_parallelism if data_cfg.read_parallelism > 0 else len(pieces)
    outputs, running = [], []
    for index, piece in enumerate(pieces):
        if len(running) >= limit:
            _, running = ray.wait(running, num_returns=1)
        outputs.append(scan.remote(piece, index, **kwargs))
        running.append(outputs[-1][0])
    find = ray.remote(_duplicates_in_bucket).options(**READ_TASK)
    duplicates = [find.remote(*[out[3 + bucket] for out in outputs]) for bucket in range(buckets)]

    in_subset = np.zeros(len(pieces), dtype=np.int64)
    last_row_line = np.full(len(pieces), -1, dtype=np.int64)
    for index, out in enumerate(outputs):
        counts, (by_reason, last_row_line[index]) = ray.get(out[0])
        ledger.add_counts(*counts)
        ledger.count_rejects(by_reason, pieces[index].source.uri)
        in_subset[index] = sum(counts[1].values())
    losers = pa.concat_tables(ray.get(duplicates)).sort_by([("piece", "ascending"), ("line", "ascending")])
    duplicates_by_piece: dict[int, list[dict]] = {}
    for row in losers.to_pylist():
        ledger.take_back(row, pieces[row["piece"]].source.uri)
        duplicates_by_piece.setdefault(row["piece"], []).append(row)
        in_subset[row["piece"]] -= int(row["sampled"])
    if rows_dir is not None:
        _drop_duplicates_written(rows_dir, duplicates_by_piece)
    scan_rejects = [out[1] for out in outputs]
    records = functools.partial(_rejects_in_order, pieces, scan_rejects, duplicates_by_piece)
    ledger.stream_rejects_from(
        records, functools.partial(_write_rejects_in_a_task, pieces, scan_rejects, duplicates_by_piece)
    )
    if ledger.on_bad_row == "error" and ledger.counts()["rows_rejected"]:
        ledger.reject(next(iter(records())))  # raises, naming the first bad row's file and line
    # per piece, the lines its reads drop: its scan's reject lines (the scan task's third return value,
    # never fetched here), with its duplicates' lines added by a task where it has any
    union = ray.remote(_union_lines).options(**READ_TASK)
    dropped = [
        union.remote(out[2], [row["line"] for row in duplicates_by_piece[index]])
        if index in duplicates_by_piece
        else out[2]
        for index, out in enumerate(outputs)
    ]
    return _Plan(pieces, dropped, in_subset, last_row_line, rows_dir)


def hash_buckets() -> int:
    """How many hash buckets a join over ids cuts them into: two per CPU of the cluster, one task each."""
    return max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))


def id_buckets(ids, buckets: int) -> np.ndarray:
    """Each id's hash bucket in ``range(buckets)`` (a list or an Arrow array of ids): the same id lands
    in the same bucket in every task and run."""
    values = ids.to_numpy(zero_copy_only=False) if isinstance(ids, pa.Array | pa.ChunkedArray) else ids
    return pd.util.hash_array(np.asarray(values, dtype=object)) % buckets


def _union_lines(lines: np.ndarray, more: list[int]) -> np.ndarray:
    return np.union1d(lines, np.asarray(more, dtype=np.int64))


def _write_rejects_in_a_task(pieces, scan_rejects: list, duplicates_by_piece: dict, path: Path) -> int:
    """``write_rejects(path, _rejects_in_order(...))`` in a Ray task on this node, which reads the
    records from the object store: the driver neither holds nor maps them (their pages would count in
    its memory). No CPU is reserved: a stage's workers may hold them all."""
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(_write_rejects_in_order).options(num_cpus=0, scheduling_strategy=node)
    return ray.get(task.remote(str(path), pieces, scan_rejects, duplicates_by_piece))


def _write_rejects_in_order(path: str, pieces, scan_rejects: list, duplicates_by_piece: dict) -> int:
    return write_rejects(path, _rejects_in_order(pieces, scan_rejects, duplicates_by_piece))


def _rejects_in_order(pieces: list[Piece], scan_rejects: list, duplicates_by_piece: dict[int, list[dict]]):
    """Every reject record in source order: per piece, its scan rejects (fetched from the object store
    one piece at a time) merged by line with its ``duplicate_id`` rejects, whose raw text is read back
    from the piece."""
    for index, piece in enumerate(pieces):
        duplicates = [
            duplicate_reject(
                row["id"],
                piece.source.uri,
                row["line"],
                pieces[row["first_piece"]].source.uri,
                row["first_line"],
                None,
            )
            for row in duplicates_by_piece.get(index, [])
        ]
        _fill_raw(piece, duplicates)
        yield from heapq.merge(ray.get(scan_rejects[index]), duplicates, key=lambda reject: reject["line"])


_ID_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("piece", pa.int64()),
        ("line", pa.int64()),
        ("n_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("sampled", pa.bool_()),
    ]
)


def _scan_piece(
    piece: Piece,
    index: int,
    *,
    tokenizer_name: str | None,
    max_seq_length: int,
    seed: int,
    subset_ratio: float,
    buckets: int,
    rows_dir: str | None,
    tokens: bool = False,
    replies_alone: bool = False,
    loss_on: str = "assistant",
) -> tuple:
    """One piece of pass 1: ((counts, (reject lines, rejects by reason, last row line)), the reject
    records, then the accepted rows' ids in ``buckets`` tables). With ``rows_dir`` the rows in the
    subset are written to its ``part-<index>.parquet`` (none when the piece has no such row), with
    ``tokens`` their encodings too (``token_schema``)."""
    tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name else None
    rejects = []
    ids, datasets, lines, n_tokens, truncated, sampled = [], [], [], [], [], []
    writer = None
    if rows_dir is not None:
        token_columns = None
        if tokens:
            token_columns = functools.partial(
                _token_columns,
                tokenizer=tokenizer,
                max_seq_length=max_seq_length,
                replies_alone=replies_alone,
            )
        writer = _PartWriter(rows_dir, index, token_columns, replies_alone)
    scanned = scan_piece(
        piece, tokenizer=tokenizer, max_seq_length=max_seq_length, keep_tokens=tokens, loss_on=loss_on
    )
    for item in scanned:
        if item.reject is not None:
            rejects.append(item.reject)
            continue
        row = item.row
        dataset, row_id = row["dataset"], row["id"]
        in_sample = in_subset(seed, dataset, row_id, subset_ratio)
        ids.append(row_id)
        datasets.append(dataset)
        lines.append(row["line"])
        n_tokens.append(item.n_tokens)
        truncated.append(item.truncated)
        sampled.append(in_sample)
        if writer is not None and in_sample:
            writer.add(row, item.encoded)
    if writer is not None:
        writer.close()
    columns = (ids, datasets, [index] * len(ids), lines, n_tokens, truncated, sampled)
    table = pa.table(dict(zip(_ID_SCHEMA.names, columns, strict=True)), schema=_ID_SCHEMA)
    bucket = id_buckets(ids, buckets)
    parts = [table.filter(pa.array(bucket == b)) for b in range(buckets)]
    last_row_line = lines[-1] if lines else -1
    summary = (Counter(map(reason_code, rejects)), last_row_line)
    reject_lines = np.asarray([reject["line"] for reject in rejects], dtype=np.int64)
    counts = (
        Counter(datasets),
        Counter(itertools.compress(datasets, sampled)),
        Counter(length for length in n_tokens if length is not None),
        sum(truncated),
    )
    return (counts, summary), rejects, reject_lines, *parts


class _PartWriter:
    """A piece's rows (``ROW_SCHEMA``) into ``rows_dir/part-<index>.parquet``, ``OUTPUT_ROWS`` at a time;
    with ``token_columns`` (``_token_columns`` bound to a tokenizer) their ``token_schema`` columns too,
    made from the scan's encodings."""

    def __init__(self, rows_dir: str, index: int, token_columns=None, replies_alone: bool = False):
        self.path = _part_path(rows_dir, index)
        self.token_columns = token_columns
        self.schema = ROW_SCHEMA
        if token_columns is not None:
            self.schema = pa.schema(list(ROW_SCHEMA) + list(token_schema(replies_alone)))
        self.rows: list[dict] = []
        self.encoded: list[dict | None] = []
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict, encoded: dict | None = None) -> None:
        self.rows.append(row)
        self.encoded.append(encoded)
        if len(self.rows) >= OUTPUT_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a node other than the driver's
            self.writer = pq.ParquetWriter(self.path, self.schema)
        table = pa.Table.from_pylist(self.rows, schema=ROW_SCHEMA)
        if self.token_columns is not None:
            messages = [row["messages"] for row in self.rows]
            for name, column in self.token_columns(messages, self.encoded).items():
                table = table.append_column(name, column)
        self.writer.write_table(table)
        self.rows, self.encoded = [], []


def _part_path(rows_dir: str | Path, index: int) -> Path:
    return Path(rows_dir) / f"part-{index:06d}.parquet"


def _drop_duplicates_written(rows_dir: Path, duplicates_by_piece: dict[int, list[dict]]) -> None:
    """Rewrite, in Ray tasks, the parts that hold a duplicate in the subset without it."""
    drop = ray.remote(_drop_lines).options(**READ_TASK)
    ray.get(
        [
            drop.remote(str(_part_path(rows_dir, index)), [row["line"] for row in rows if row["sampled"]])
            for index, rows in duplicates_by_piece.items()
            if any(row["sampled"] for row in rows)
        ]
    )


def _drop_lines(path: str, lines: list[int]) -> None:
    table = pq.read_table(path)
    kept = table.filter(pc.invert(pc.is_in(table["line"], value_set=pa.array(lines, pa.int64()))))
    if kept.num_rows:
        pq.write_table(kept, path)
    else:
        Path(path).unlink()


def _duplicates_in_bucket(*tables: pa.Table) -> pa.Table:
    """The rows of one hash bucket whose id an earlier row (by piece, line) has, with that row's
    piece and line as ``first_piece``, ``first_line``."""
    table = pa.concat_tables(tables).sort_by([("piece", "ascending"), ("line", "ascending")])
    codes = pc.dictionary_encode(table["id"]).combine_chunks().indices.to_numpy()
    _, first_of_code = np.unique(codes, return_index=True)
    first = first_of_code[codes]
    later = first != np.arange(len(codes))
    where = first[later]
    losers = table.filter(pa.array(later))
    losers = losers.append_column("first_piece", table["piece"].take(where))
    return losers.append_column("first_line", table["line"].take(where))


def _fill_raw(piece: Piece, rejects: list[dict]) -> None:
    """Read the raw text of ``rejects`` (lines of ``piece``) back from the piece."""
    texts = raw_texts(piece, {reject["line"] for reject in rejects})
    for reject in rejects:
        reject["raw"] = texts[reject["line"]][:MAX_RAW_CHARS]


def _accepted_rows(
    batch: pa.Table,
    *,
    seed: int,
    subset_ratio: float,
    scan_dropped: list,
    outside: bool = False,
    ids=None,
    key_below: float = 1.0,
) -> Iterator[pa.Table]:
    """One piece's accepted rows in the subset (``outside``: those it left out, of ``ids`` or with a
    ``random_key`` below ``key_below``), but its ``dropped`` lines and those ``scan_dropped`` (the
    plan's) holds for it."""
    piece = _piece_of(batch)
    index = batch["index"][0].as_py()
    rejected = set(json.loads(batch["dropped"][0].as_py())) | set(ray.get(scan_dropped[index]).tolist())
    ids = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids
    rows = []

    def table() -> pa.Table:
        out = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        if ids is not None:
            return out.filter(pc.is_in(out["id"], value_set=ids))
        return out.filter(pc.less(random_key(seed, out["id"]), key_below)) if key_below < 1 else out

    for item in scan_piece(piece):
        row = item.row
        if row is None or row["line"] in rejected:
            continue
        if in_subset(seed, row["dataset"], row["id"], subset_ratio) == outside:
            continue
        rows.append(row)
        if len(rows) >= OUTPUT_ROWS:
            yield table()
            rows = []
    if rows:
        yield table()


def _written_rows(batch: pa.Table, *, rows_dir: str, columns: list[str]) -> Iterator[pa.Table]:
    """``columns`` of one piece's part (its rows in the subset, as the scan wrote them) but its
    ``dropped`` lines."""
    path = _part_path(rows_dir, batch["index"][0].as_py())
    dropped = pa.array(json.loads(batch["dropped"][0].as_py()), pa.int64())
    if not path.exists():  # the piece has no row in the subset
        return
    for part in pq.ParquetFile(path).iter_batches(OUTPUT_ROWS, columns=[*columns, "line"]):
        table = pa.Table.from_batches([part])
        if len(dropped):
            table = table.filter(pc.invert(pc.is_in(table["line"], value_set=dropped)))
        yield table.select(columns)


# ---------------------------------------------------------------------------- tokenisation

TOKENIZED_KEEP = ("id", "dataset", "source", "line")  # the row columns tokenized rows keep


@contextlib.contextmanager
def scratch_removed(output_dir: Path):
    """Around a stage's run: its scratch copies of the rows (``layout.ROWS_SCRATCH``,
    ``TRUSTED_ROWS_SCRATCH``) and stage 2's ``TRAINING_ROWS_SCRATCH`` are removed when it ends, done or
    failed; a rerun writes them again."""
    try:
        yield
    finally:
        for name in (ROWS_SCRATCH, TRUSTED_ROWS_SCRATCH, TRAINING_ROWS_SCRATCH):
            shutil.rmtree(output_dir / name, ignore_errors=True)


def read_tokenized(
    dataset_cfg, data_cfg, *, seed: int, tokenizer_name: str, rows_dir: Path, loss_on: str = "assistant"
) -> RowsRead:
    """``read_rows`` for a training stage, the text read and tokenised once: the scan writes the rows in
    the subset with their tokens to ``rows_dir`` (a scratch folder, emptied first). The result's ``rows``
    are materialised, with the columns ``tokenize_rows(rows, tokenizer_name,
    dataset_cfg.max_sequence_length, loss_on)`` gives. The caller removes ``rows_dir`` when the stage
    ends, not before: Ray rebuilds a block lost with a node from the part it was read from."""
    shutil.rmtree(rows_dir, ignore_errors=True)
    read = read_rows(
        dataset_cfg,
        data_cfg,
        seed=seed,
        tokenizer_name=tokenizer_name,
        rows_dir=rows_dir,
        tokens=True,
        loss_on=loss_on,
    )
    rows = read.rows_not_done(lambda: iter(()), columns=[*TOKENIZED_KEEP, *token_schema().names]).rows
    if rows is None:
        schema = pa.schema([ROW_SCHEMA.field(name) for name in TOKENIZED_KEEP] + list(token_schema()))
        rows = ray.data.from_arrow(schema.empty_table())
    return replace(read, rows=rows.materialize())


def tokenize_rows(
    rows: ray.data.Dataset,
    tokenizer_name: str,
    max_seq_length: int,
    loss_on: str = "assistant",
    keep: tuple[str, ...] = TOKENIZED_KEEP,
    replies_alone: bool = False,
) -> ray.data.Dataset:
    """Rows -> ``keep`` columns + ``input_ids``, ``labels`` (int32 lists), ``n_tokens``,
    ``n_assistant_tokens``, through ``selectmoe.data.template.encode_batch``; with ``replies_alone``
    also ``reply_input_ids``, ``reply_labels``: the replies without their prompts (``encode_replies_alone``).

    Read the rows with the same ``tokenizer_name`` and ``max_seq_length`` so that rows truncation
    would empty are rejects already; one that is not fails here rather than vanish.
    """
    tokenized = rows.map_batches(
        _tokenize_batch,
        batch_size=TOKENIZE_BATCH_ROWS,
        batch_format="pyarrow",
        fn_kwargs={
            "tokenizer_name": tokenizer_name,
            "max_seq_length": max_seq_length,
            "loss_on": loss_on,
            "keep": keep,
            "replies_alone": replies_alone,
        },
    )
    tokenized.context.execution_options.preserve_order = True
    return tokenized


def _tokenize_batch(
    batch: pa.Table,
    *,
    tokenizer_name: str,
    max_seq_length: int,
    loss_on: str,
    keep: tuple[str, ...],
    replies_alone: bool,
) -> pa.Table:
    tokenizer = load_tokenizer(tokenizer_name)
    messages = batch["messages"].to_pylist()
    encoded = encode_batch(messages, tokenizer, max_seq_length=max_seq_length, loss_on=loss_on)
    for index, result in enumerate(encoded):
        if isinstance(result, RowError):
            row = batch.slice(index, 1).to_pylist()[0]
            raise DataError(
                f"{row['source']}, line {row['line']}: {result} (read the rows with this tokenizer and "
                "max_sequence_length, so that read_rows rejects such rows)"
            )
    columns = {name: batch[name] for name in keep}
    columns.update(_token_columns(messages, encoded, tokenizer, max_seq_length, replies_alone))
    return pa.table(columns)


def _token_columns(
    messages: list[list[dict]], encoded: list[dict], tokenizer, max_seq_length: int, replies_alone: bool
) -> dict[str, pa.Array]:
    """``token_schema(replies_alone)``'s columns for rows and their ``encode_batch`` results."""
    columns = {
        "input_ids": _int32_lists([result["input_ids"] for result in encoded]),
        "labels": _int32_lists([result["labels"] for result in encoded]),
        "n_tokens": pa.array([result["n_tokens"] for result in encoded], type=pa.int64()),
        "n_assistant_tokens": pa.array([result["n_assistant_tokens"] for result in encoded], type=pa.int64()),
    }
    if replies_alone:
        replies = encode_replies_alone(
            messages,
            tokenizer,
            max_seq_length=max_seq_length,
            n_assistant_tokens=[result["n_assistant_tokens"] for result in encoded],
        )
        columns["reply_input_ids"] = _int32_lists([reply["input_ids"] for reply in replies])
        columns["reply_labels"] = _int32_lists([reply["labels"] for reply in replies])
    return columns


def _int32_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(array) for array in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def task_as_dataset(batch: pa.Table) -> pa.Table:
    """A target row's task, in its ``dataset`` column: its ``task`` field, else its dataset (a
    ``map_batches`` function)."""
    tasks = [
        str(json.loads(extra or "{}").get("task") or dataset)
        for extra, dataset in zip(batch["extra"].to_pylist(), batch["dataset"].to_pylist())
    ]
    return batch.set_column(batch.schema.get_field_index("dataset"), "dataset", pa.array(tasks, pa.string()))


def mix_reference(corpus: ray.data.Dataset, reference: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """Tokenised corpus and reference rows in one dataset with a ``reference`` flag, in a seeded order
    (a hash of each id; independent of blocks and files), so every training step sees both kinds."""
    flagged = [
        ds.map_batches(_with_flag, batch_format="pyarrow", fn_kwargs={"flag": flag, "seed": seed})
        for ds, flag in ((corpus, False), (reference, True))
    ]
    return flagged[0].union(flagged[1]).sort("order_key").drop_columns(["order_key"])


def _with_flag(batch: pa.Table, *, flag: bool, seed: int) -> pa.Table:
    batch = batch.append_column("reference", pa.array([flag] * batch.num_rows, pa.bool_()))
    return batch.append_column("order_key", random_key(seed, batch["id"]))

"""Ray Data front end of the data layer: normalised rows as a ``ray.data.Dataset``.

Built on the same pieces as ``selectmoe.data.iter_rows`` (``scan_source`` per file, one
``RowLedger``), so the rows, line numbers, ids, rejects and counts are the same. ``read_rows``
makes two passes, one Ray task per input file in each:

1. a scan: every record becomes a small summary (id, dataset, token count; reason and raw text
   for a reject) streamed to the driver in source order, where the ledger finds duplicate ids,
   applies ``on_bad_row`` (failing fast, before any expensive stage work) and counts; the raw
   text of duplicates is then read back from their files (only files that have duplicates);
2. the returned lazy ``Dataset``: the files read again, keeping rows that are neither rejected
   nor outside the ``subset_ratio`` sample. It streams (memory follows the block, not the corpus)
   and can be executed any number of times.

``tokenize_rows`` maps those rows through the one chat template (``input_ids``, ``labels``).

Tasks take one CPU each and no actor pool is created, so on a 2-CPU laptop nothing starves.
Local use: ``ray.init()`` first (or let Ray Data start a local cluster); on a cluster the workers
must reach the input URIs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from selectmoe.data.ledger import RowLedger
from selectmoe.data.readers import Source, raw_text, read_records, resolve_sources
from selectmoe.data.rejects import MAX_RAW_CHARS, DataError, RowError
from selectmoe.data.rows import Scanned, admit, scan_source
from selectmoe.data.subset import in_subset
from selectmoe.data.template import encode_batch, encode_replies_alone, load_tokenizer
from selectmoe.scaling import ensure_ray

OUTPUT_ROWS = 1024  # rows per table a read task yields
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
_SUMMARY_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line", pa.int64()),
        ("dataset", pa.string()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
        ("n_tokens", pa.int64()),
        ("truncated", pa.bool_()),
    ]
)


@dataclass
class RowsRead:
    rows: ray.data.Dataset  # accepted rows in the subset, schema ``ROW_SCHEMA``, source order
    ledger: RowLedger  # counts(), rejects, token_length_stats()
    sources: list[Source]


def read_rows(dataset_cfg, data_cfg, *, seed: int = 0, tokenizer_name: str | None = None) -> RowsRead:
    """Scan the inputs of ``dataset_cfg`` (pass 1) and return the lazy dataset of accepted rows.

    With ``tokenizer_name`` the scan also checks the template against
    ``dataset.max_sequence_length`` and records token lengths for the percentiles.
    """
    sources = resolve_sources(dataset_cfg)  # before Ray starts: a missing input fails at once
    ensure_ray()
    ledger = RowLedger.from_config(dataset_cfg, data_cfg, seed)
    scan = _per_source(
        sources,
        data_cfg,
        _summarise_sources,
        tokenizer_name=tokenizer_name,
        max_seq_length=dataset_cfg.max_sequence_length,
    )
    for batch in scan.iter_batches(batch_size=None, batch_format="pyarrow"):
        for item in batch.to_pylist():
            if item["reason"] is not None:
                ledger.reject({key: item[key] for key in ("source", "line", "reason", "raw")})
            else:
                admit(ledger, _summary_as_scanned(item))
    _fill_duplicates_raw(ledger.rejects)
    rows = _per_source(
        sources,
        data_cfg,
        _accepted_rows,
        rejected_lines=ledger.rejected_lines(),
        seed=seed,
        subset_ratio=dataset_cfg.subset_ratio,
    )
    return RowsRead(rows=rows, ledger=ledger, sources=sources)


def _per_source(sources: list[Source], data_cfg, fn, **fn_kwargs) -> ray.data.Dataset:
    """One task per input file running ``fn``; output kept in source order (deterministic)."""
    items = [{"uri": source.uri, "dataset": source.dataset} for source in sources]
    concurrency = data_cfg.read_parallelism if data_cfg.read_parallelism > 0 else None
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs, concurrency=concurrency
    )
    dataset.context.execution_options.preserve_order = True
    return dataset


def _source_of(batch: pa.Table) -> Source:
    return Source(uri=batch["uri"][0].as_py(), dataset=batch["dataset"][0].as_py())


def _summarise_sources(
    batch: pa.Table, *, tokenizer_name: str | None, max_seq_length: int
) -> Iterator[pa.Table]:
    tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name else None
    summaries = []
    for item in scan_source(_source_of(batch), tokenizer=tokenizer, max_seq_length=max_seq_length):
        if item.reject is not None:
            summary = dict(item.reject, dataset=None, id=None, n_tokens=None, truncated=False)
        else:
            row = item.row
            summary = {
                "source": row["source"],
                "line": row["line"],
                "dataset": row["dataset"],
                "id": row["id"],
                "reason": None,
                "raw": None,  # only a duplicate needs it: read back by _fill_duplicates_raw
                "n_tokens": item.n_tokens,
                "truncated": item.truncated,
            }
        summaries.append(summary)
        if len(summaries) >= OUTPUT_ROWS:
            yield pa.Table.from_pylist(summaries, schema=_SUMMARY_SCHEMA)
            summaries = []
    if summaries:
        yield pa.Table.from_pylist(summaries, schema=_SUMMARY_SCHEMA)


def _summary_as_scanned(item: dict) -> Scanned:
    row = {key: item[key] for key in ("dataset", "id", "source", "line")}
    return Scanned(row, None, item["raw"], item["n_tokens"], item["truncated"])


def _fill_duplicates_raw(rejects: list[dict]) -> None:
    missing: dict[str, dict[int, dict]] = {}
    for reject in rejects:
        if reject["raw"] is None:
            missing.setdefault(reject["source"], {})[reject["line"]] = reject
    for source, by_line in missing.items():
        for record in read_records(source):
            reject = by_line.pop(record.line, None)
            if reject is not None:
                reject["raw"] = raw_text(record)[:MAX_RAW_CHARS]
            if not by_line:
                break


def _accepted_rows(
    batch: pa.Table, *, rejected_lines: dict[str, set[int]], seed: int, subset_ratio: float
) -> Iterator[pa.Table]:
    source = _source_of(batch)
    rejected = rejected_lines.get(source.uri, set())
    rows = []
    for item in scan_source(source):
        row = item.row
        if row is None or row["line"] in rejected:
            continue
        if not in_subset(seed, row["dataset"], row["id"], subset_ratio):
            continue
        rows.append(row)
        if len(rows) >= OUTPUT_ROWS:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ---------------------------------------------------------------------------- tokenisation


def tokenize_rows(
    rows: ray.data.Dataset,
    tokenizer_name: str,
    max_seq_length: int,
    loss_on: str = "assistant",
    keep: tuple[str, ...] = ("id", "dataset", "source", "line"),
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
    columns["input_ids"] = _int32_lists([result["input_ids"] for result in encoded])
    columns["labels"] = _int32_lists([result["labels"] for result in encoded])
    columns["n_tokens"] = pa.array([result["n_tokens"] for result in encoded], type=pa.int64())
    columns["n_assistant_tokens"] = pa.array(
        [result["n_assistant_tokens"] for result in encoded], type=pa.int64()
    )
    if replies_alone:
        replies = encode_replies_alone(
            messages,
            tokenizer,
            max_seq_length=max_seq_length,
            n_assistant_tokens=[result["n_assistant_tokens"] for result in encoded],
        )
        columns["reply_input_ids"] = _int32_lists([reply["input_ids"] for reply in replies])
        columns["reply_labels"] = _int32_lists([reply["labels"] for reply in replies])
    return pa.table(columns)


def _int32_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(array) for array in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def mix_reference(corpus: ray.data.Dataset, reference: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """Tokenised corpus and reference rows in one dataset with a ``reference`` flag, in a seeded order
    (a hash of each id; independent of blocks and files), so every training step sees both kinds."""
    flagged = [
        ds.map_batches(_with_flag, batch_format="pyarrow", fn_kwargs={"flag": flag, "seed": seed})
        for ds, flag in ((corpus, False), (reference, True))
    ]
    return flagged[0].union(flagged[1]).sort("order_key").drop_columns(["order_key"])


def _with_flag(batch: pa.Table, *, flag: bool, seed: int) -> pa.Table:
    from selectmoe.data.subset import random_key

    batch = batch.append_column("reference", pa.array([flag] * batch.num_rows, pa.bool_()))
    return batch.append_column("order_key", random_key(seed, batch["id"]))

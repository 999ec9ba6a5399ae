"""Find the input files and stream raw records out of them.

Inputs are ``.jsonl``, ``.jsonl.gz``, ``.json`` (a JSON array, or JSON lines), ``.json.gz`` and
``.parquet`` files, folders of them (recursive, sorted, hidden ``.``/``_`` entries skipped), globs,
and any URI fsspec opens (``file://``, ``s3://``, ``gs://``). JSON lines are read one line at a
time and Parquet one record batch at a time, so memory follows the batch, not the file; a ``.json``
array is parsed whole (use JSON lines or Parquet for big corpora).

A record's ``line`` is 1-based: the line number in JSON lines (blank lines are skipped but
counted), the row number in Parquet files and JSON arrays.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from selectmoe.data.rejects import DataError, RowError

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = "*?["
_SNIFF_BYTES = 4096


@dataclass(frozen=True)
class Source:
    """One input file: its path (local) or URI (remote), and the dataset name for rows without one."""

    uri: str
    dataset: str


class RawRecord(NamedTuple):
    line: int
    value: Any  # the parsed JSON value or Parquet row; None when ``error`` is set
    raw: str | None  # the text as read; None for Parquet / JSON-array rows (see ``raw_text``)
    error: RowError | None


def raw_text(record: RawRecord) -> str:
    if record.raw is not None:
        return record.raw
    return json.dumps(record.value, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------- resolving inputs


def resolve_sources(dataset_cfg) -> list[Source]:
    """The input files of a ``DatasetConfig``, in order: entries as given, each expanded sorted.

    ``dataset.data_path`` rows without a ``dataset`` field are named after their file's stem;
    with ``dataset.data_dir`` + ``dataset.dataset_names`` each name is a folder (or a file stem)
    under ``data_dir`` and names the rows read from it. A file named twice is read once.
    """
    if dataset_cfg.data_path:
        groups = [_expand(entry) for entry in dataset_cfg.data_path]
    elif dataset_cfg.data_dir and dataset_cfg.dataset_names:
        groups = [_expand_named(dataset_cfg.data_dir, name) for name in dataset_cfg.dataset_names]
    else:
        raise DataError("no input: set dataset.data_path, or dataset.data_dir with dataset.dataset_names")
    sources, seen = [], set()
    for group in groups:
        for source in group:
            if source.uri not in seen:
                seen.add(source.uri)
                sources.append(source)
    return sources


def dataset_name_of(path: str) -> str:
    """``.../cot.jsonl.gz`` -> ``cot``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _expand(entry: str, dataset: str | None = None) -> list[Source]:
    fs, path = url_to_fs(entry)
    if any(char in path for char in _GLOB_CHARS):
        files = []
        for match in sorted(fs.glob(path)):
            if fs.isdir(match):
                files.extend(_files_under(fs, match))
            elif _is_supported(match) and not _is_hidden(match.rsplit("/", 1)[-1]):
                files.append(match)
    elif fs.isdir(path):
        files = _files_under(fs, path)
    elif fs.exists(path):
        if not _is_supported(path):
            raise DataError(f"{entry}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
        files = [path]
    else:
        raise DataError(f"{entry}: no such file or folder")
    if not files:
        raise DataError(f"{entry}: no {', '.join(SUFFIXES)} files found")
    return [Source(_uri(fs, f), dataset or dataset_name_of(f)) for f in files]


def _expand_named(data_dir: str, name: str) -> list[Source]:
    entry = f"{data_dir.rstrip('/')}/{name}"
    fs, path = url_to_fs(entry)
    if fs.isdir(path):
        return _expand(entry, dataset=name)
    for suffix in SUFFIXES:
        if fs.exists(path + suffix):
            return [Source(_uri(fs, path + suffix), name)]
    raise DataError(f"dataset {name!r}: no folder {name}/ or file {name}.jsonl/.parquet/... under {data_dir}")


def _files_under(fs, folder: str) -> list[str]:
    files = []
    for path in sorted(fs.find(folder)):
        relative = path[len(folder.rstrip("/")) + 1 :]
        if _is_supported(path) and not any(_is_hidden(part) for part in relative.split("/")):
            files.append(path)
    return files


def _is_supported(path: str) -> bool:
    return path.endswith(SUFFIXES)


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _uri(fs, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------- reading records


def read_records(uri: str) -> Iterator[RawRecord]:
    """Stream the records of one file; a file that breaks off ends with one ``unreadable_file`` record."""
    line = 0
    try:
        for record in _read_by_format(uri):
            line = record.line
            yield record
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        yield RawRecord(line + 1, None, "", RowError("unreadable_file", f"{type(err).__name__}: {err}"))


def _read_by_format(uri: str) -> Iterator[RawRecord]:
    if uri.endswith(".parquet"):
        yield from _read_parquet(uri)
    elif uri.endswith((".jsonl", ".jsonl.gz")) or not _starts_with_array(uri):
        yield from _read_json_lines(uri)
    else:
        yield from _read_json_array(uri)


def _open(uri: str):
    return fsspec.open(uri, "rb", compression="gzip" if uri.endswith(".gz") else None)


def _starts_with_array(uri: str) -> bool:
    with _open(uri) as fh:
        head = fh.read(_SNIFF_BYTES)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _read_json_lines(uri: str) -> Iterator[RawRecord]:
    with _open(uri) as fh:
        for line, data in enumerate(fh, start=1):
            try:
                text = data.decode("utf-8-sig" if line == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raw = data.decode("utf-8", errors="replace").rstrip("\r\n")
                yield RawRecord(line, None, raw, RowError("bad_encoding", str(err)))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                yield RawRecord(line, None, text, RowError("bad_json", str(err)))
                continue
            yield RawRecord(line, value, text, None)


def _read_json_array(uri: str) -> Iterator[RawRecord]:
    with _open(uri) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield RawRecord(1, None, data.decode("utf-8", errors="replace"), RowError("bad_encoding", str(err)))
        return
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        bad_line = text.splitlines()[err.lineno - 1] if text.strip() else text
        yield RawRecord(err.lineno, None, bad_line, RowError("bad_json", str(err)))
        return
    for row, value in enumerate(values, start=1):
        yield RawRecord(row, value, None, None)


def _read_parquet(uri: str) -> Iterator[RawRecord]:
    with _open(uri) as fh:
        row = 0
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for value in batch.to_pylist():
                row += 1
                yield RawRecord(row, value, None, None)

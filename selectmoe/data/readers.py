"""Find the input files and stream raw records out of them.

Inputs are ``.jsonl``, ``.jsonl.gz``, ``.json`` (a JSON array, or JSON lines), ``.json.gz`` and
``.parquet`` files, folders of them (recursive, sorted, hidden ``.``/``_`` entries skipped), globs,
and any URI fsspec opens (``file://``, ``s3://``, ``gs://``). JSON lines are read one line at a
time and Parquet one record batch at a time, so memory follows the batch, not the file; a ``.json``
array is parsed whole (use JSON lines or Parquet for big corpora).

A record's ``line`` is 1-based: the line number in JSON lines (blank lines are skipped but
counted), the row number in Parquet files and JSON arrays.

A large file is read in ``Piece``s by parallel tasks (``split_source``): plain JSON lines in byte
ranges, each task reading the lines that *start* in its range (so a boundary inside a line, inside a
multi-byte character or between ``\r`` and ``\n`` loses and repeats nothing), Parquet by row
groups. Line numbers stay the file's own: a JSON lines piece is told how many newlines come before
it (``count_newlines`` over the earlier pieces, a fast byte count). Gzip files and JSON arrays are
not seekable by line, so each is one piece.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from selectmoe.data.rejects import DataError, RowError

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = "*?["
_SNIFF_BYTES = 4096
_DIGITS_AS_ZERO = bytes(48 if 48 <= byte <= 57 else byte for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19


@dataclass(frozen=True)
class Source:
    """One input file: its path (local) or URI (remote), and the dataset name for rows without one."""

    uri: str
    dataset: str


@dataclass(frozen=True)
class Piece:
    """What one read task reads of a file: bytes ``[start, end)`` of JSON lines (the lines that
    start there) or row groups ``[start, end)`` of Parquet; the whole file when ``end`` is None.
    ``lines_before``: newlines (JSON lines) or rows (Parquet) before the piece."""

    source: Source
    start: int = 0
    end: int | None = None
    lines_before: int = 0


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


# ---------------------------------------------------------------------------- splitting files


def split_source(source: Source, piece_bytes: int) -> list[Piece]:
    """The pieces of one file, about ``piece_bytes`` each (``<= 0``: the whole file). JSON lines
    pieces after a file's first still need their ``lines_before`` (``with_lines_before``)."""
    uri = source.uri
    if piece_bytes <= 0 or uri.endswith(".gz"):
        return [Piece(source)]
    if uri.endswith(".parquet"):
        return _row_group_pieces(source, piece_bytes)
    if uri.endswith(".json") and _starts_with_array(uri):
        return [Piece(source)]
    size = file_size(uri)
    starts = range(0, size, piece_bytes)
    return [
        Piece(source, start, start + piece_bytes if start + piece_bytes < size else None) for start in starts
    ] or [Piece(source)]


def file_size(uri: str) -> int:
    fs, path = url_to_fs(uri)
    return fs.size(path)


def _row_group_pieces(source: Source, piece_bytes: int) -> list[Piece]:
    with _open(source.uri) as fh:
        meta = pq.ParquetFile(fh).metadata
    pieces, first, size, rows, rows_before = [], 0, 0, 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        rows += meta.row_group(group).num_rows
        if size >= piece_bytes or group == meta.num_row_groups - 1:
            pieces.append(Piece(source, first, group + 1, rows_before))
            first, size, rows_before, rows = group + 1, 0, rows_before + rows, 0
    return pieces if len(pieces) > 1 else [Piece(source)]


def newline_ranges(pieces: list[Piece]) -> list[Piece]:
    """The JSON lines pieces whose newlines (``count_newlines``) the later pieces of their file need."""
    return [p for p in pieces if p.end is not None and not p.source.uri.endswith(".parquet")]


def count_newlines(piece: Piece) -> int:
    """Newlines in a piece's byte range (a byte count, no parsing)."""
    count = 0
    with _open(piece.source.uri) as fh:
        fh.seek(piece.start)
        remaining = piece.end - piece.start
        while remaining > 0:
            chunk = fh.read(min(1 << 24, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def with_lines_before(pieces: list[Piece], newlines: list[int]) -> list[Piece]:
    """The pieces with ``lines_before`` set; ``newlines``: ``count_newlines`` of each
    ``newline_ranges(pieces)``, in order."""
    counts = {(p.source.uri, p.start): n for p, n in zip(newline_ranges(pieces), newlines, strict=True)}
    done, before = [], {}
    for piece in pieces:
        uri = piece.source.uri
        if uri.endswith(".parquet"):
            done.append(piece)
            continue
        lines = before.get(uri, 0)
        done.append(replace(piece, lines_before=lines))
        before[uri] = lines + counts.get((uri, piece.start), 0)
    return done


# ---------------------------------------------------------------------------- reading records


def read_records(uri: str, piece: Piece | None = None) -> Iterator[RawRecord]:
    """Stream the records of one file (or of one ``piece`` of it); a file that breaks off ends with
    one ``unreadable_file`` record."""
    piece = piece or Piece(Source(uri, ""))
    line = piece.lines_before
    try:
        for record in _read_by_format(uri, piece):
            line = record.line
            yield record
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        yield RawRecord(line + 1, None, "", RowError("unreadable_file", f"{type(err).__name__}: {err}"))


def raw_texts(piece: Piece, lines: set[int]) -> dict[int, str]:
    """The raw text (``raw_text``) of ``lines`` of a piece, reading no further than the last of them;
    JSON lines are not parsed (the duplicates' raw text in ``rejects.jsonl``)."""
    found: dict[int, str] = {}
    if lines:
        for line, text in _raw_lines(piece):
            if line in lines:
                found[line] = text
                if len(found) == len(lines):
                    break
    return found


def _raw_lines(piece: Piece) -> Iterator[tuple[int, str]]:
    uri = piece.source.uri
    if not _is_json_lines(uri):
        yield from ((record.line, raw_text(record)) for record in read_records(uri, piece))
        return
    with _open(uri) as fh:
        for line, data in _json_lines(fh, piece):
            yield line, _line_text(line, data, errors="replace")


def _is_json_lines(uri: str) -> bool:
    return not uri.endswith(".parquet") and (
        uri.endswith((".jsonl", ".jsonl.gz")) or not _starts_with_array(uri)
    )


def _read_by_format(uri: str, piece: Piece) -> Iterator[RawRecord]:
    if uri.endswith(".parquet"):
        yield from _read_parquet(uri, piece)
    elif _is_json_lines(uri):
        yield from _read_json_lines(uri, piece)
    else:
        yield from _read_json_array(uri)


def _open(uri: str):
    return fsspec.open(uri, "rb", compression="gzip" if uri.endswith(".gz") else None)


def _starts_with_array(uri: str) -> bool:
    with _open(uri) as fh:
        head = fh.read(_SNIFF_BYTES)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _json_lines(fh, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the lines that start in the piece's byte range."""
    line, position = piece.lines_before, piece.start
    if piece.start > 0:
        fh.seek(piece.start - 1)
        head = fh.readline()  # the end of a line that started before the range (or just its newline)
        if not head.endswith(b"\n"):
            return
        position += len(head) - 1
        line += len(head) > 1  # that newline lies in the range: not counted in lines_before
    while piece.end is None or position < piece.end:
        data = fh.readline()
        if not data:
            return
        position += len(data)
        line += 1
        yield line, data


def _line_text(line: int, data: bytes, errors: str = "strict") -> str:
    """A JSON line's text: UTF-8 (a byte-order mark dropped on line 1), without its line ending."""
    return data.decode("utf-8-sig" if line == 1 else "utf-8", errors=errors).rstrip("\r\n")


def _read_json_lines(uri: str, piece: Piece) -> Iterator[RawRecord]:
    with _open(uri) as fh:
        for line, data in _json_lines(fh, piece):
            try:
                text = _line_text(line, data)
            except UnicodeDecodeError as err:
                raw = _line_text(line, data, errors="replace")
                yield RawRecord(line, None, raw, RowError("bad_encoding", str(err)))
                continue
            if not text or text.isspace():  # a blank line (strip() would copy the text)
                continue
            try:
                value = _parse_json_line(data, text)
            except json.JSONDecodeError as err:
                yield RawRecord(line, None, text, RowError("bad_json", str(err)))
                continue
            yield RawRecord(line, value, text, None)


def _parse_json_line(data: bytes, text: str) -> Any:
    """``json.loads(text)``, faster: orjson parses the line's bytes (``data``) exactly as json does. A
    line with a run of 19 or more digits (an integer beyond 64 bits, which orjson turns into a float, or
    a long mantissa) goes to ``json.loads``, as does what orjson refuses (NaN, escaped lone surrogates, a
    byte-order mark, broken JSON), which json accepts or rejects as it always did (its message is the
    reject's)."""
    if data.translate(_DIGITS_AS_ZERO).find(_NINETEEN_DIGITS) < 0:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


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


def _read_parquet(uri: str, piece: Piece) -> Iterator[RawRecord]:
    with _open(uri) as fh:
        file = pq.ParquetFile(fh)
        end = file.metadata.num_row_groups if piece.end is None else piece.end
        row = piece.lines_before
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=range(piece.start, end)):
            for value in batch.to_pylist():
                row += 1
                yield RawRecord(row, value, None, None)

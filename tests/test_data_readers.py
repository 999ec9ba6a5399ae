"""Readers and normalisation through the plain-Python front end (``iter_rows``): every input
format and row schema gives the same normalised rows."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_TRAIN

from selectmoe.config import DataConfig, DatasetConfig
from selectmoe.data import DataError, RowLedger, content_id, iter_rows, resolve_sources
from selectmoe.data.readers import (
    Piece,
    Source,
    count_newlines,
    newline_ranges,
    read_records,
    split_source,
    with_lines_before,
)

SAMPLE_LINES = 12
FORMATS = ["jsonl", "jsonl_gz", "json_array", "json_lines", "parquet"]


def write_formats(rows_by_name: dict[str, list[dict]], root: Path, formats=FORMATS) -> dict[str, Path]:
    """The same rows in every supported format: one folder per format, one file per dataset."""
    folders = {}
    for fmt in formats:
        folder = root / fmt
        folder.mkdir(parents=True)
        for name, rows in rows_by_name.items():
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            if fmt == "jsonl":
                (folder / f"{name}.jsonl").write_text(lines)
            elif fmt == "jsonl_gz":
                (folder / f"{name}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
            elif fmt == "json_array":
                (folder / f"{name}.json").write_text(json.dumps(rows, indent=2))
            elif fmt == "json_lines":
                (folder / f"{name}.json").write_text(lines)
            else:
                pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet", row_group_size=5)
        folders[fmt] = folder
    return folders


@pytest.fixture(scope="session")
def less_rows() -> dict[str, list[dict]]:
    """The first lines of each shared LESS file."""
    rows = {}
    for path in sorted(SHARED_TRAIN.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            rows[path.stem] = [json.loads(line) for line in itertools.islice(fh, SAMPLE_LINES)]
    return rows


@pytest.fixture(scope="session")
def less_formats(less_rows, tmp_path_factory) -> dict[str, Path]:
    return write_formats(less_rows, tmp_path_factory.mktemp("less_formats"))


def read(data_path=None, **dataset_keys) -> tuple[list[dict], RowLedger]:
    cfg = DatasetConfig(data_path=None if data_path is None else [str(p) for p in data_path], **dataset_keys)
    ledger = RowLedger.from_config(cfg, DataConfig(), seed=0)
    return list(iter_rows(cfg, ledger)), ledger


def without_source(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "source"} for row in rows]


# ---------------------------------------------------------------------------- formats


def test_jsonl_rows_are_the_less_rows(less_rows, less_formats):
    rows, ledger = read([less_formats["jsonl"]])
    expected = [
        {**row, "extra": "{}", "line": line}
        for name in sorted(less_rows)
        for line, row in enumerate(less_rows[name], start=1)
    ]
    assert without_source(rows) == expected
    assert ledger.counts()["rows_read"] == len(expected) == ledger.counts()["rows_accepted"]


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_every_format_gives_the_same_rows(less_formats, fmt):
    expected, _ = read([less_formats["jsonl"]])
    rows, _ = read([less_formats[fmt]])
    assert without_source(rows) == without_source(expected)
    suffix = {"jsonl_gz": ".jsonl.gz", "json_array": ".json", "json_lines": ".json", "parquet": ".parquet"}[
        fmt
    ]
    assert all(row["source"].endswith(suffix) for row in rows)


def test_globs_uris_and_nested_folders(less_formats, tmp_path):
    expected, _ = read([less_formats["jsonl"]])
    by_glob, _ = read([f"{less_formats['jsonl']}/*.jsonl"])
    by_uri, _ = read([f"file://{less_formats['jsonl']}"])
    assert by_glob == expected
    assert by_uri == expected

    nested = tmp_path / "nested"
    (nested / "deeper").mkdir(parents=True)
    (nested / "_tmp").mkdir()
    for path in sorted(less_formats["jsonl"].glob("*.jsonl")):
        target = nested / ("deeper" if path.stem < "g" else ".") / path.name
        target.write_bytes(path.read_bytes())
    (nested / ".hidden.jsonl").write_text("not json\n")
    (nested / "_tmp" / "partial.jsonl").write_text("not json\n")
    (nested / "README.md").write_text("# notes\n")
    rows, ledger = read([nested])
    assert without_source(sorted(rows, key=lambda r: r["id"])) == without_source(
        sorted(expected, key=lambda r: r["id"])
    )
    assert ledger.counts()["rows_rejected"] == 0


def test_a_file_named_twice_is_read_once(less_formats):
    path = less_formats["jsonl"] / "cot.jsonl"
    rows, ledger = read([path, less_formats["jsonl"]])
    assert len(rows) == 4 * SAMPLE_LINES
    assert ledger.counts()["rows_rejected"] == 0


def test_data_dir_with_dataset_names(tmp_path, less_rows):
    data_dir = tmp_path / "data"
    (data_dir / "alpha").mkdir(parents=True)
    bare = [{"messages": row["messages"]} for row in less_rows["cot"]]  # no dataset, no id
    (data_dir / "alpha" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare[:5]))
    pq.write_table(pa.Table.from_pylist(bare[5:]), data_dir / "alpha" / "part-1.parquet")
    (data_dir / "beta.jsonl.gz").write_bytes(gzip.compress(json.dumps(bare[0]).encode()))
    rows, ledger = read(data_dir=str(data_dir), dataset_names=["beta", "alpha"])
    assert [row["dataset"] for row in rows] == ["beta"] + ["alpha"] * len(bare)
    assert rows[0]["id"] == content_id("beta", bare[0]["messages"])
    assert rows[1]["id"] == content_id("alpha", bare[0]["messages"])
    assert ledger.counts()["datasets"] == {
        "alpha": {"rows_accepted": len(bare), "rows_sampled": len(bare)},
        "beta": {"rows_accepted": 1, "rows_sampled": 1},
    }


def test_inputs_that_cannot_be_resolved_fail_naming_them(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        resolve_sources(DatasetConfig(data_path=[str(tmp_path / "missing.jsonl")]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_sources(DatasetConfig(data_path=[str(tmp_path / "notes.txt")]))
    with pytest.raises(DataError, match="no folder gamma/"):
        resolve_sources(DatasetConfig(data_dir=str(tmp_path), dataset_names=["gamma"]))
    with pytest.raises(DataError, match="set dataset.data_path"):
        resolve_sources(DatasetConfig())


def test_lines_are_one_based_and_count_blank_lines(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "gaps.jsonl").write_text(
        "\n" + json.dumps(row) + "\n\n   \n" + json.dumps({**row, "id": "b"}) + "\n"
    )
    rows, ledger = read([tmp_path / "gaps.jsonl"])
    assert [row["line"] for row in rows] == [2, 5]
    assert ledger.counts()["rows_read"] == 2


def test_json_lines_parse_exactly_as_json_loads_does(tmp_path):
    """The fast parser (orjson) refuses some lines json.loads accepts; those and broken lines go to
    json.loads, so every line reads, or is rejected with json's message, as it always was."""
    chat = '"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]'
    lines = [
        '{"id": "plain", "n": 1.5, ' + chat + "}",
        '{"id": "nan", "score": NaN, ' + chat + "}",
        '{"id": "big", "n": 123456789012345678901234567890, ' + chat + "}",
        '{"id": "surrogate", "note": "\\ud800", ' + chat + "}",
        '{"id": "broken", ' + chat,
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = list(read_records(str(path)))
    assert [record.value for record in records[:4]] == [json.loads(line) for line in lines[:4]]
    try:
        json.loads(lines[4])
    except json.JSONDecodeError as err:
        expected = str(err)
    assert records[4].value is None
    assert (records[4].error.reason, records[4].error.detail) == ("bad_json", expected)


# ---------------------------------------------------------------------------- schemas

USER, ASSISTANT = "Name a colour.", "Blue."
CHAT = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]
SCHEMA_ROWS = [
    ({"id": "m", "messages": CHAT, "source_url": "x"}, CHAT, {"source_url": "x"}),
    ({"id": "pc", "prompt": USER, "completion": ASSISTANT, "score": 0.5}, CHAT, {"score": 0.5}),
    ({"id": "a1", "instruction": USER, "input": "", "output": ASSISTANT}, CHAT, {}),
    (
        {"id": "a2", "instruction": USER, "input": "Not red.", "output": ASSISTANT, "category": "qa"},
        [{"role": "user", "content": f"{USER}\n\nNot red."}, CHAT[1]],
        {"category": "qa"},
    ),
    (
        {
            "id": "sg",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": USER},
                {"from": "gpt", "value": ASSISTANT},
            ],
            "lang": "en",
        },
        [{"role": "system", "content": "Be brief."}, *CHAT],
        {"lang": "en"},
    ),
    (
        {
            "id": 7,
            "conversations": [{"from": "user", "value": USER}, {"from": "assistant", "value": ASSISTANT}],
        },
        CHAT,
        {},
    ),
]


def test_every_schema_normalises_to_messages_and_keeps_extra_fields(tmp_path):
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(raw) + "\n" for raw, _, _ in SCHEMA_ROWS))
    rows, ledger = read([tmp_path / "mixed.jsonl"])
    assert ledger.counts()["rows_rejected"] == 0
    assert [row["messages"] for row in rows] == [messages for _, messages, _ in SCHEMA_ROWS]
    assert [json.loads(row["extra"]) for row in rows] == [extra for _, _, extra in SCHEMA_ROWS]
    assert [row["id"] for row in rows] == ["m", "pc", "a1", "a2", "sg", "7"]
    assert {row["dataset"] for row in rows} == {"mixed"}  # the file stem


def test_missing_ids_are_content_hashes_stable_across_formats(tmp_path):
    bare = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(4)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    pq.write_table(pa.Table.from_pylist(bare), tmp_path / "b" / "toy.parquet")
    from_jsonl, _ = read([tmp_path / "a"])
    from_parquet, _ = read([tmp_path / "b"])
    ids = [row["id"] for row in from_jsonl]
    assert ids == [row["id"] for row in from_parquet]
    assert len(set(ids)) == 4 and all(i.startswith("toy_") for i in ids)
    assert ids[0] == content_id("toy", from_jsonl[0]["messages"])


def test_subset_ratio_is_deterministic_and_order_independent(less_formats):
    files = sorted(less_formats["jsonl"].glob("*.jsonl"))
    everything, _ = read(files)
    half, ledger = read(files, subset_ratio=0.5)
    reversed_order, _ = read(files[::-1], subset_ratio=0.5)
    cfg = DatasetConfig(data_path=[str(f) for f in files], subset_ratio=0.5)
    other_seed = list(iter_rows(cfg, RowLedger(subset_ratio=0.5, seed=1)))
    assert 0 < len(half) < len(everything)
    assert sorted(r["id"] for r in reversed_order) == sorted(r["id"] for r in half)
    assert ledger.counts()["rows_accepted"] == len(everything)
    assert ledger.counts()["rows_sampled"] == len(half)
    assert {r["id"] for r in other_seed} != {r["id"] for r in half}


# ---------------------------------------------------------------------------- pieces of large files

TRICKY_LINES = [
    '\ufeff{"id": "a", "text": "first line after a byte-order mark"}',
    '{"id": "b", "text": "multi-byte: é 中文 🙂 at the end 🙂"}',
    "",
    '{"id": "c", "text": "a blank line before me, \\r\\n after me"}\r',
    "{not json at all",
    '{"id": "d", "text": "🙂🙂🙂🙂🙂🙂🙂🙂 four-byte characters across any boundary"}',
    '{"id": "e", "text": "no newline at the end of the file"}',
]


def read_in_pieces(source: Source, piece_bytes: int) -> list:
    pieces = split_source(source, piece_bytes)
    pieces = with_lines_before(pieces, [count_newlines(p) for p in newline_ranges(pieces)])
    return pieces, [comparable(record) for piece in pieces for record in read_records(source.uri, piece)]


def comparable(record) -> tuple:
    return record.line, record.value, record.raw, None if record.error is None else str(record.error)


def test_every_split_of_a_json_lines_file_reads_each_line_once_with_its_own_number(tmp_path):
    path = tmp_path / "tricky.jsonl"
    path.write_bytes("\n".join(TRICKY_LINES).encode())  # \r\n on one line, none after the last
    source = Source(str(path), "tricky")
    whole = [comparable(record) for record in read_records(str(path))]
    assert [r[0] for r in whole] == [1, 2, 4, 5, 6, 7] and whole[0][1]["id"] == "a"
    assert whole[3][3].startswith("bad_json")
    size = path.stat().st_size
    for piece_bytes in range(1, size + 1):  # boundaries inside characters, lines, \r\n, the BOM
        pieces, records = read_in_pieces(source, piece_bytes)
        assert len(pieces) == -(-size // piece_bytes)
        assert records == whole, piece_bytes


def test_a_parquet_file_splits_by_row_groups_and_keeps_row_numbers(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": str(i), "n": i} for i in range(23)]), path, row_group_size=4)
    source = Source(str(path), "rows")
    whole = [comparable(record) for record in read_records(str(path))]
    pieces, records = read_in_pieces(source, 1)
    assert len(pieces) == 6 and records == whole
    assert [r[0] for r in records] == list(range(1, 24))
    # a gzip file is not seekable by line: it stays one piece
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"id": "x"}\n' * 50))
    assert split_source(Source(str(gz), "rows"), 10) == [Piece(Source(str(gz), "rows"))]

"""Validation: every kind of bad row is rejected with its reason, counts add up, and
``on_bad_row=error`` stops naming file, line and field — in ``iter_rows`` and in ``validate_data``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selectmoe.config import DataConfig, DatasetConfig, ValidateDataConfig
from selectmoe.data import DataError, RowLedger, iter_rows, load_tokenizer
from selectmoe.data.rejects import MAX_RAW_CHARS, REASONS
from selectmoe.manifest import read_manifest

MAX_TOKENS = 128
U = {"role": "user", "content": "Name a colour."}
A = {"role": "assistant", "content": "Blue."}

# bad.jsonl, line by line: (the line, the reject reason or None when the row is accepted)
BAD_LINES: list[tuple[bytes | str, str | None]] = [
    (json.dumps({"id": "good-1", "messages": [U, A]}), None),
    ('{"id": "broken", "messages": [', "bad_json"),
    (b'{"id": "latin1", "messages": "caf\xe9"}', "bad_encoding"),
    ("[1, 2, 3]", "bad_type"),
    (json.dumps({"id": "t1", "messages": "hello"}), "bad_type"),
    (json.dumps({"id": "t2", "messages": [{"role": "user", "content": 5}, A]}), "bad_type"),
    (json.dumps({"id": "t3", "dataset": 3.5, "messages": [U, A]}), "bad_type"),
    (json.dumps({"id": "t4", "messages": ["y" * 5000]}), "bad_type"),
    (json.dumps({"id": "e1", "messages": [{"role": "user", "content": " \n "}, A]}), "empty_content"),
    (json.dumps({"id": "n1", "messages": [U]}), "no_assistant_turn"),
    (json.dumps({"id": "n2", "messages": []}), "no_assistant_turn"),
    (json.dumps({"id": "s1", "text": "just text"}), "unknown_schema"),
    (json.dumps({"id": "r1", "messages": [{"role": "bot", "content": "Hi"}, A]}), "bad_role"),
    (json.dumps({"id": "r2", "conversations": [{"from": "alien", "value": "Hi"}]}), "bad_role"),
    (json.dumps({"id": "o1", "messages": [U, U, A]}), "bad_turn_order"),
    (json.dumps({"id": "o2", "messages": [U, A, U]}), "bad_turn_order"),
    (json.dumps({"id": "o3", "messages": [U, {"role": "system", "content": "Be brief."}, A]}), "bad_turn_order"),
    ("", None),  # blank: skipped, not a row
    (json.dumps({"id": "good-1", "messages": [U, {"role": "assistant", "content": "Red."}]}), "duplicate_id"),
    (json.dumps({"id": "dup-across", "prompt": "Hi", "completion": "Hello"}), "duplicate_id"),
    (json.dumps({"id": "long", "messages": [{"role": "user", "content": "word " * 400}, A]}), "no_assistant_tokens_after_truncation"),
    (json.dumps({"id": "good-2", "prompt": "Hi", "completion": "Hello"}), None),
]  # fmt: skip


def expected_rejects() -> list[tuple[str, int, str]]:
    """(file name, line, reason code) in source order: the files sort a_first, array, bad, broken."""
    in_bad = [("bad.jsonl", line, reason) for line, (_, reason) in enumerate(BAD_LINES, 1) if reason]
    return [("array.json", 2, "bad_json"), *in_bad, ("broken.jsonl.gz", 1, "unreadable_file")]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_rows")
    (folder / "a_first.jsonl").write_text(json.dumps({"id": "dup-across", "messages": [U, A]}) + "\n")
    (folder / "array.json").write_text('[{"id": "x", "messages": []},\n {"id": ]')
    lines = [line if isinstance(line, bytes) else line.encode() for line, _ in BAD_LINES]
    (folder / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "broken.jsonl.gz").write_bytes(b"this is not gzip data")
    return folder


def read(folder: Path, tokenizer=None, on_bad_row: str = "skip") -> tuple[list[dict], RowLedger]:
    cfg = DatasetConfig(data_path=[str(folder)], max_sequence_length=MAX_TOKENS)
    ledger = RowLedger.from_config(cfg, DataConfig(on_bad_row=on_bad_row), seed=0)
    return list(iter_rows(cfg, ledger, tokenizer=tokenizer)), ledger


def as_triples(rejects: list[dict]) -> list[tuple[str, int, str]]:
    return [(Path(r["source"]).name, r["line"], r["reason"].split(":", 1)[0]) for r in rejects]


def test_every_bad_row_is_rejected_with_its_reason(bad_folder, tokenizer_dir):
    rows, ledger = read(bad_folder, tokenizer=load_tokenizer(tokenizer_dir))
    assert as_triples(list(ledger.rejected())) == expected_rejects()
    assert [row["id"] for row in rows] == ["dup-across", "good-1", "good-2"]
    assert {code for _, _, code in expected_rejects()} == set(REASONS)  # the fixture covers every code

    counts = ledger.counts()
    records = 1 + 1 + sum(1 for line, _ in BAD_LINES if line) + 1  # a_first, array, bad.jsonl, broken
    assert counts["rows_read"] == records == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts["rows_accepted"] == 3 and counts["rows_rejected"] == len(expected_rejects())
    assert counts["rejected_by_reason"] == dict(sorted(Counter(c for _, _, c in expected_rejects()).items()))


def test_without_a_tokenizer_long_rows_are_kept(bad_folder):
    rows, ledger = read(bad_folder)
    assert "long" in [row["id"] for row in rows]
    assert "no_assistant_tokens_after_truncation" not in ledger.counts()["rejected_by_reason"]


def test_reject_records_say_where_why_and_what(bad_folder):
    _, ledger = read(bad_folder)
    by_line = {r["line"]: r for r in ledger.rejected() if r["source"].endswith("bad.jsonl")}
    assert set(list(ledger.rejected())[0]) == {"source", "line", "reason", "raw"}
    assert by_line[2]["raw"] == BAD_LINES[1][0]
    assert by_line[2]["reason"].startswith("bad_json: ")
    assert "\ufffd" in by_line[3]["raw"]  # undecodable bytes shown as replacement characters
    assert "'messages[0].content' is int" in by_line[6]["reason"]
    assert len(by_line[8]["raw"]) == MAX_RAW_CHARS
    assert "a_first.jsonl, line 1" in by_line[20]["reason"]  # where the id was first seen


def test_on_bad_row_error_stops_at_the_first_bad_row(tmp_path, bad_folder):
    with pytest.raises(DataError, match=r"array\.json, line 2: bad_json"):
        read(bad_folder, on_bad_row="error")
    (tmp_path / "typed.jsonl").write_text(
        json.dumps({"messages": [U, A]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": 5}, A]})
        + "\n"
    )
    with pytest.raises(DataError) as raised:
        read(tmp_path, on_bad_row="error")
    message = str(raised.value)
    assert str(tmp_path / "typed.jsonl") in message
    assert "line 2" in message and "messages[0].content" in message


# ---------------------------------------------------------------------------- validate_data (Ray Data)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_validate_data_writes_rows_rejects_and_manifest(ray_session, bad_folder, tokenizer_dir, tmp_path):
    from selectmoe.validate_data import validate_data

    cfg = ValidateDataConfig(
        output_dir=str(tmp_path / "validate"),
        tokenizer_name=tokenizer_dir,
        dataset=DatasetConfig(data_path=[str(bad_folder)], max_sequence_length=MAX_TOKENS),
    )
    out = validate_data(cfg)
    assert out == tmp_path / "validate"

    expected_rows, expected_ledger = read(bad_folder, tokenizer=load_tokenizer(tokenizer_dir))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == list(expected_ledger.rejected())
    assert as_triples(rejects) == expected_rejects()

    assert pq.read_table(out / "rows").to_pylist() == expected_rows  # source order, across the parts

    manifest = read_manifest(out)
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts == expected_ledger.counts()
    assert set(manifest["metrics"]["token_lengths"]) == {"p50", "p90", "p99", "max", "mean"}
    assert manifest["metrics"]["token_lengths"]["max"] <= MAX_TOKENS  # the long row is a reject
    assert [source["path"] for source in manifest["inputs"]["sources"]] == [
        str(bad_folder / name) for name in ("a_first.jsonl", "array.json", "bad.jsonl", "broken.jsonl.gz")
    ]

    validate_data(cfg)  # a rerun replaces rows/, it does not append
    assert pq.read_table(out / "rows").num_rows == len(expected_rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_validate_data_on_bad_row_error_names_file_and_line(ray_session, bad_folder, tmp_path):
    from selectmoe.validate_data import validate_data

    cfg = ValidateDataConfig(
        output_dir=str(tmp_path / "validate"),
        dataset=DatasetConfig(data_path=[str(bad_folder)]),
        data=DataConfig(on_bad_row="error"),
    )
    with pytest.raises(DataError, match=r"array\.json, line 2: bad_json"):
        validate_data(cfg)
    assert not (tmp_path / "validate" / "rows").exists()  # no half-written rows

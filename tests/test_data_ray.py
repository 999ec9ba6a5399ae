"""The Ray Data front end (``selectmoe.ray_data.read_rows``) gives what ``iter_rows`` gives:
the same rows in the same order, the same rejects, counts and subset; and it streams."""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_TRAIN
from test_data_readers import FORMATS, SCHEMA_ROWS, less_rows, write_formats  # noqa: F401 (fixture)
from test_data_rejects import bad_folder  # noqa: F401 (fixture)

from selectmoe.config import DataConfig, DatasetConfig
from selectmoe.data import RowLedger, encode_batch, iter_rows, load_tokenizer
from selectmoe.data.rejects import DataError
from selectmoe.data.subset import random_key
from selectmoe.ray_data import ROW_SCHEMA, plan_pieces, read_rows, read_tokenized, tokenize_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COT = SHARED_TRAIN / "cot.jsonl"


@pytest.fixture(scope="module")
def mixed_inputs(less_rows, bad_folder, tmp_path_factory) -> list[str]:  # noqa: F811
    """Every format (ids suffixed per format so none is a duplicate), every schema, every bad row;
    named by a glob, a ``file://`` URI and a folder."""
    root = tmp_path_factory.mktemp("mixed")
    for fmt in FORMATS:
        suffixed = {
            name: [{**row, "id": f"{row['id']}-{fmt}"} for row in rows] for name, rows in less_rows.items()
        }
        write_formats(suffixed, root / "formats", formats=[fmt])
    (root / "schemas.jsonl").write_text("".join(json.dumps(raw) + "\n" for raw, _, _ in SCHEMA_ROWS))
    return [
        str(root / "formats" / "*"),
        f"file://{root / 'schemas.jsonl'}",
        str(bad_folder),
    ]  # glob, URI, folder


def read_both(cfg: DatasetConfig, tokenizer_dir: str | None = None):
    result = read_rows(cfg, DataConfig(), seed=0, tokenizer_name=tokenizer_dir)
    ledger = RowLedger.from_config(cfg, DataConfig(), seed=0)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return result, list(iter_rows(cfg, ledger, tokenizer=tokenizer)), ledger


def test_ray_rows_rejects_and_counts_equal_the_iterator(ray_session, mixed_inputs, tokenizer_dir, tmp_path):
    cfg = DatasetConfig(data_path=mixed_inputs, max_sequence_length=128)
    result, expected, ledger = read_both(cfg, tokenizer_dir)
    # rejects.jsonl: written by a Ray task from the object store, byte for byte the iterator's
    written = result.ledger.write_rejects(tmp_path / "ray.jsonl")
    assert written == ledger.write_rejects(tmp_path / "plain.jsonl") > 0
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()

    rows = result.rows.take_all()
    assert rows == expected  # same rows, same order, lines and ids
    assert result.rows.schema().base_schema == ROW_SCHEMA
    assert list(result.ledger.rejected()) == list(ledger.rejected())
    assert result.ledger.counts() == ledger.counts()
    assert result.ledger.token_length_stats() == ledger.token_length_stats()

    by_format = {fmt: [r for r in rows if r["id"].endswith(f"-{fmt}")] for fmt in FORMATS}
    reference = [{**r, "id": r["id"].removesuffix("-jsonl")} for r in by_format["jsonl"]]
    for fmt in FORMATS:
        same = [{**r, "id": r["id"].removesuffix(f"-{fmt}")} for r in by_format[fmt]]
        assert [{k: v for k, v in r.items() if k != "source"} for r in same] == [
            {k: v for k, v in r.items() if k != "source"} for r in reference
        ], fmt


def test_files_read_in_pieces_give_the_same_rows_rejects_and_counts(
    ray_session, mixed_inputs, tokenizer_dir, tmp_path
):
    """Byte ranges of JSON lines and row groups of Parquet, read by parallel tasks, with duplicate ids
    in another file and in a later piece of the same one: what one task per file gives, and iter_rows."""
    cot = COT.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(cot[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(cot[25:35] + cot[3:4]) + "\n")  # 5 + 1 duplicates
    cfg = DatasetConfig(data_path=[*mixed_inputs, str(tmp_path)], max_sequence_length=128)
    whole, expected, ledger = read_both(cfg, tokenizer_dir)
    split = read_rows(cfg, DataConfig(split_bytes=700), seed=0, tokenizer_name=tokenizer_dir)
    assert len(plan_pieces(split.sources, 700)) > 2 * len(split.sources)
    assert split.rows.take_all() == whole.rows.take_all() == expected
    assert list(split.ledger.rejected()) == list(whole.ledger.rejected()) == list(ledger.rejected())
    assert (
        split.ledger.counts() == ledger.counts()
        and ledger.counts()["rejected_by_reason"]["duplicate_id"] >= 6
    )
    assert split.ledger.token_length_stats() == ledger.token_length_stats()

    # the scan writing the rows itself (validate-data): the same rows, duplicates dropped from the parts
    written = tmp_path / "written"
    written.mkdir()
    read = read_rows(cfg, DataConfig(split_bytes=700), seed=0, tokenizer_name=tokenizer_dir, rows_dir=written)
    assert pq.read_table(written).to_pylist() == expected
    assert read.rows.take_all() == expected  # read back from the parts, not from the text


def test_the_scan_writes_the_tokens_tokenize_rows_would_add(
    ray_session, mixed_inputs, tokenizer_dir, tmp_path
):
    """``read_rows(tokens=True)`` (stage 2 reads the text once): the parts hold, beside the rows, the
    columns ``tokenize_rows`` makes of them, the replies alone included, in pieces with duplicates; a
    resumed read gets them but the rows done."""
    cot = COT.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(cot[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(cot[25:35] + cot[3:4]) + "\n")  # 6 duplicates
    cfg = DatasetConfig(data_path=[*mixed_inputs, str(tmp_path / "*.jsonl")], max_sequence_length=128)
    plain = read_rows(cfg, DataConfig(split_bytes=700), seed=0, tokenizer_name=tokenizer_dir)
    expected = tokenize_rows(plain.rows, tokenizer_dir, 128, replies_alone=True).take_all()
    (tmp_path / "parts").mkdir()
    read = read_rows(
        cfg,
        DataConfig(split_bytes=700),
        seed=0,
        tokenizer_name=tokenizer_dir,
        rows_dir=tmp_path / "parts",
        tokens=True,
        replies_alone=True,
    )
    columns = list(expected[0])
    assert "reply_input_ids" in columns

    def plain_lists(rows: list[dict]) -> list[dict]:
        return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()} for row in rows]

    written = read.rows_not_done(lambda: iter(()), columns=columns).rows.take_all()
    assert plain_lists(written) == plain_lists(expected) and len(expected) > 30
    assert read.rows.take_all() == plain.rows.take_all()  # the rows themselves, without the tokens
    done = expected[::2]
    done_at = pa.Table.from_pylist([{"source": r["source"], "line": r["line"]} for r in done])
    left = read.rows_not_done(lambda: iter([done_at]), columns=["id", "input_ids"]).rows.take_all()
    assert plain_lists(left) == [
        {"id": r["id"], "input_ids": r["input_ids"]} for r in plain_lists(expected)[1::2]
    ]
    with pytest.raises(ValueError, match="rows_dir"):
        plain.rows_not_done(lambda: iter(()), columns=["id"])


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_a_training_stage_reads_the_rows_it_would_tokenise_in_one_pass(
    ray_session, mixed_inputs, tokenizer_dir, tmp_path, loss_on
):
    """``read_tokenized`` (stages 1 and 3): in a sample with duplicates across pieces, the rows and
    their tokens equal ``tokenize_rows`` of the rows read from the text, labels as ``data.loss_on``
    says; they are in Ray's object store, so they outlive the scratch the scan wrote them to."""
    cot = COT.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(cot[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(cot[25:35] + cot[3:4]) + "\n")  # 6 duplicates
    cfg = DatasetConfig(
        data_path=[*mixed_inputs, str(tmp_path / "*.jsonl")], max_sequence_length=128, subset_ratio=0.7
    )
    plain = read_rows(cfg, DataConfig(split_bytes=700), seed=3, tokenizer_name=tokenizer_dir)
    expected = tokenize_rows(plain.rows, tokenizer_dir, 128, loss_on).take_all()
    scratch = tmp_path / "scratch"
    read = read_tokenized(
        cfg,
        DataConfig(split_bytes=700),
        seed=3,
        tokenizer_name=tokenizer_dir,
        rows_dir=scratch,
        loss_on=loss_on,
    )
    shutil.rmtree(scratch)  # as the stage does when it ends

    def plain_lists(rows: list[dict]) -> list[dict]:
        return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()} for row in rows]

    got = plain_lists(read.rows.take_all())
    assert got == plain_lists(expected) and 20 < len(got) < read.ledger.counts()["rows_accepted"]
    assert read.ledger.counts() == plain.ledger.counts()
    labelled_everywhere = [r["labels"] == r["input_ids"] for r in got]
    assert all(labelled_everywhere) if loss_on == "all" else not any(labelled_everywhere)


def test_a_resumed_read_skips_pieces_done_and_drops_the_lines_done(ray_session, mixed_inputs, tmp_path):
    """What a resumed stage 2 reads (``rows_not_done``): every row of the subset not done before (found
    by source and line, in any order), pieces all done not read again; rows done at lines these inputs
    have no row at are an error."""
    cot = COT.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(cot[:60]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(cot[55:70] + cot[3:4]) + "\n")  # 6 duplicates
    cfg = DatasetConfig(data_path=[*mixed_inputs, str(tmp_path)], subset_ratio=0.8)
    read = read_rows(cfg, DataConfig(split_bytes=700), seed=0)
    rows = read.rows.take_all()
    done = rows[len(rows) // 2 :: 3] + rows[: len(rows) // 2]  # the first half, and every third after it

    def where(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist([{"source": r["source"], "line": r["line"]} for r in rows])

    left = read.rows_not_done(lambda: iter([where(done[:7]), where(done[7:])]))
    done_at = {(r["source"], r["line"]) for r in done}
    assert left.rows.take_all() == [r for r in rows if (r["source"], r["line"]) not in done_at]
    assert left.rows_done == len(done)
    assert 0 < left.pieces_skipped < left.pieces

    every = read.rows_not_done(lambda: iter([where(rows)]))
    assert every.rows is None and every.rows_done == len(rows)
    with pytest.raises(DataError, match="past its last row"):
        read.rows_not_done(lambda: iter([pa.table({"source": [rows[-1]["source"]], "line": [10**6]})]))


def test_ray_subset_equals_the_iterator_subset(ray_session, mixed_inputs, tmp_path):
    cfg = DatasetConfig(data_path=mixed_inputs, subset_ratio=0.3)
    result, expected, ledger = read_both(cfg)
    rows = result.rows.take_all()
    assert rows == expected
    assert 0 < len(rows) < ledger.counts()["rows_accepted"]
    assert result.ledger.counts() == ledger.counts()
    assert read_rows(cfg, DataConfig(), seed=0).rows.take_all() == rows  # re-read: the same sample
    written = tmp_path / "written"
    written.mkdir()
    read_rows(cfg, DataConfig(), seed=0, rows_dir=written)
    assert pq.read_table(written).to_pylist() == rows  # the scan writes the sample alone

    # what the subset left out (stage 1's probe rows): every other accepted row, once, duplicates' and
    # rejects' lines never among them
    every = read_rows(DatasetConfig(data_path=mixed_inputs), DataConfig(), seed=0).rows.take_all()
    inside = {r["id"] for r in rows}
    left_out = result.outside_subset().take_all()
    assert sorted(r["id"] for r in left_out) == sorted(r["id"] for r in every if r["id"] not in inside)
    assert {(r["id"], r["line"]) for r in left_out} <= {(r["id"], r["line"]) for r in every}
    wanted = pa.array([r["id"] for r in left_out[::3]] + [rows[0]["id"]])  # a subset row is not returned
    assert [r["id"] for r in result.outside_subset(ids=wanted).take_all()] == [r["id"] for r in left_out[::3]]
    sample = [r["id"] for r in result.outside_subset(key_below=0.5).take_all()]
    keys = random_key(0, pa.array([r["id"] for r in left_out])).to_pylist()
    assert sample == [r["id"] for r, key in zip(left_out, keys) if key < 0.5]
    assert 0 < len(sample) < len(left_out)


def test_reading_30k_rows_streams_on_two_cpus(ray_session):
    driver = psutil.Process(os.getpid())
    before = driver.memory_info().rss
    result = read_rows(DatasetConfig(data_path=[str(COT)]), DataConfig(), seed=0)
    counted, peak = 0, 0
    for batch in result.rows.iter_batches(batch_size=1000, batch_format="pyarrow"):
        assert batch.num_rows <= 1000
        counted += batch.num_rows
        peak = max(peak, driver.memory_info().rss)
    assert counted == 30_028
    assert result.ledger.counts()["rows_read"] == 30_028 == result.ledger.counts()["rows_accepted"]
    # the driver holds the ids (for duplicates) and a few batches, not the 14 MB corpus as rows
    assert peak - before < 300 * 1024**2


def test_tokenize_rows_uses_the_one_template(ray_session, mixed_inputs, tokenizer_dir):
    cfg = DatasetConfig(data_path=mixed_inputs, max_sequence_length=128)
    result, expected, _ = read_both(cfg, tokenizer_dir)
    tokenized = tokenize_rows(result.rows, tokenizer_dir, 128).take_all()
    encoded = encode_batch(
        [row["messages"] for row in expected], load_tokenizer(tokenizer_dir), max_seq_length=128
    )
    assert [row["id"] for row in tokenized] == [row["id"] for row in expected]
    for row, reference in zip(tokenized, encoded):
        assert list(row["input_ids"]) == reference["input_ids"].tolist()
        assert list(row["labels"]) == reference["labels"].tolist()
        assert row["n_assistant_tokens"] == reference["n_assistant_tokens"] > 0
        assert set(row) == {
            "id",
            "dataset",
            "source",
            "line",
            "input_ids",
            "labels",
            "n_tokens",
            "n_assistant_tokens",
        }


def test_tokenize_rows_fails_on_a_row_the_read_did_not_check(ray_session, mixed_inputs, tokenizer_dir):
    unchecked = read_rows(DatasetConfig(data_path=mixed_inputs), DataConfig(), seed=0).rows  # no tokenizer
    with pytest.raises(
        Exception, match=r"\.(jsonl?|parquet|gz), line \d+: no_assistant_tokens_after_truncation"
    ):
        tokenize_rows(unchecked, tokenizer_dir, 128).take_all()

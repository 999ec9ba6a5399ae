"""The selected rows as stage 2 writes them: ``selected.jsonl`` and ``selected.parquet``.

A record is the original row's fields (``dataset``, ``id``, ``messages``, then its other fields), then
``score`` and ``rank`` (and ``target_task`` under ``selection.method=similarity``); records are in rank
order. Ray tasks over the rows render the records of their block (each task reads one shared copy of
the selection, k ids with their score and rank, from the object store) and write them, sorted by
rank, to a part file in the output folder; the driver merges the parts by rank into the two files a
few thousand records at a time, so it never holds the selected rows (the parts are written where the
workers write the score files, which the driver reads too).
"""

from __future__ import annotations

import heapq
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

WRITE_BATCH_ROWS = 65536  # records per Parquet row group
PARSE_ROWS = 4096  # records the driver holds parsed at once (a parsed record takes ~2 KB, its text ~0.7 KB)
MERGE_FILES = 256  # part files merged at once (more are merged in rounds)


def write_selection(
    rows: ray.data.Dataset, selected: pa.Table, jsonl: Path, parquet: Path, parts: Path
) -> None:
    """Write the ``selected`` rows (id, score, rank, maybe target_task) of ``rows`` (``read_rows``' rows)
    as JSON lines (``ensure_ascii=False``) and as Parquet, whose columns are every field of any record
    in first-seen order (a field a record lacks is null there); ``parts`` is a scratch folder."""
    if not selected.num_rows:
        jsonl.write_text("")
        pq.write_table(pa.Table.from_pylist([]), parquet)
        return
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    written = rows.map_batches(
        write_selected_part,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"selected": ray.put(selected), "folder": str(parts)},
    ).take_all()  # a row per block: its part file's name
    files = [parts / row["file"] for row in written if row["file"]]
    while len(files) > MERGE_FILES:  # one round: groups of MERGE_FILES into one sorted file each
        groups = [files[i : i + MERGE_FILES] for i in range(0, len(files), MERGE_FILES)]
        files = [_merge_to_file(group, parts / f"merged-{uuid.uuid4().hex}.txt") for group in groups]

    def batches() -> Iterator[list[str]]:
        texts, size = [], min(PARSE_ROWS, WRITE_BATCH_ROWS)
        for _, text in heapq.merge(*(_part_records(f) for f in files)):
            texts.append(text)
            if len(texts) == size:
                yield texts
                texts = []
        if texts:
            yield texts

    schema = _schema(batches())
    with jsonl.open("w", encoding="utf-8") as fh, pq.ParquetWriter(parquet, schema) as writer:
        group: list[pa.Table] = []  # the row group being filled, as Arrow tables (compact)
        for texts in batches():
            fh.writelines(text + "\n" for text in texts)
            records = [json.loads(text) for text in texts]
            group.append(pa.table(_columns(records, schema.names, schema), schema=schema))
            if sum(t.num_rows for t in group) >= WRITE_BATCH_ROWS:
                writer.write_table(pa.concat_tables(group))
                group = []
        if group:
            writer.write_table(pa.concat_tables(group))
    shutil.rmtree(parts)


def write_selected_part(batch: pa.Table, *, selected, folder: str) -> pa.Table:
    """``map_batches`` function: the block's rows that are in ``selected`` (an object ref of the
    selection table) as JSON lines sorted by rank in a new part file of ``folder``; returns its name
    ("" when none of the block's rows is selected)."""
    selected = ray.get(selected) if isinstance(selected, ray.ObjectRef) else selected
    rows = batch.filter(pc.is_in(batch["id"], value_set=selected["id"]))
    name = ""
    if rows.num_rows:
        picked = selected.take(pc.index_in(rows["id"], value_set=selected["id"]))
        records = []
        for row, item in zip(rows.to_pylist(), picked.to_pylist()):
            record = {"dataset": row["dataset"], "id": row["id"], "messages": row["messages"]}
            record.update(json.loads(row["extra"] or "{}"))
            record.update(score=item["score"], rank=item["rank"])
            if "target_task" in item:
                record["target_task"] = item["target_task"]
            records.append((item["rank"], json.dumps(record, ensure_ascii=False)))
        name = f"part-{uuid.uuid4().hex}.txt"
        _write_records(sorted(records), Path(folder) / name)
    return pa.table({"file": pa.array([name], pa.string())})


def _write_records(records, path: Path) -> Path:
    """(rank, JSON text) pairs, one ``RANK<TAB>TEXT`` line each (JSON text holds no raw newline)."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(f"{rank}\t{text}\n" for rank, text in records)
    return path


def _part_records(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", newline="\n") as fh:
        for line in fh:
            rank, text = line.rstrip("\n").split("\t", 1)
            yield int(rank), text


def _merge_to_file(files: list[Path], path: Path) -> Path:
    _write_records(heapq.merge(*(_part_records(f) for f in files)), path)
    for f in files:
        f.unlink()
    return path


def _schema(batches) -> pa.Schema:
    """The Parquet schema over every batch: fields in first-seen order, each one's type unified
    across batches (a field null in one batch takes its type from the others)."""
    types: dict[str, list[pa.DataType]] = {}
    for texts in batches:
        records = [json.loads(text) for text in texts]
        for name in dict.fromkeys(key for record in records for key in record):
            types.setdefault(name, [])
        for name, column in _columns(records, list(types)).items():
            types[name].append(column.type)
    return pa.schema(
        [
            pa.unify_schemas([pa.schema([(name, t)]) for t in found], promote_options="permissive").field(0)
            for name, found in types.items()
        ]
    )


def _columns(records: list[dict], names: list[str], schema: pa.Schema | None = None) -> dict[str, pa.Array]:
    """The ``names`` fields of ``records`` as arrays (null where a record lacks one), of ``schema``'s
    types, else of the types these records alone give."""
    return {
        name: pa.array([r.get(name) for r in records], type=schema.field(name).type if schema else None)
        for name in names
    }

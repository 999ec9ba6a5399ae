"""Which scored rows stage 1 trained on (``selection.exclude_training_rows``), found without a central set.

A hash join in Ray tasks: the training ids (stage 1's ``training_ids.parquet``) are cut into hash
buckets, and one task per bucket holds only its bucket's ids while it streams the id column of every
score file, writing the positions (file, row) of the rows it finds, per group of score files, into a
scratch folder (``layout.TRAINING_ROWS_SCRATCH``). The driver then reads one group's positions at a
time as it streams the score files (``TrainingRows.rows_of``): neither it nor any task holds all the
training ids, and the ids are never sent to a task.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from selectmoe.ray_data import READ_TASK, hash_buckets, id_buckets

ID_BATCH_ROWS = 65536  # ids per batch read from a Parquet file


class TrainingRows:
    """The positions of the training rows in each score file (``files``, in that order)."""

    def __init__(self, folder: Path | None, groups: list[range]):
        self.folder, self.groups = folder, groups
        self._group, self._rows = None, {}

    @classmethod
    def none(cls) -> TrainingRows:
        return cls(None, [])

    def count(self) -> int:
        if self.folder is None:
            return 0
        return sum(pq.read_metadata(path).num_rows for path in sorted(self.folder.rglob("*.parquet")))

    def rows_of(self, file_index: int) -> np.ndarray:
        """The sorted row positions in score file ``file_index`` that stage 1 trained on; its group's
        positions are read when first asked for (one group in memory at a time)."""
        if self.folder is None:
            return np.array([], dtype=np.int64)
        group = next(g for g, files in enumerate(self.groups) if file_index in files)
        if group != self._group:
            parts = sorted((self.folder / f"group-{group}").glob("*.parquet"))
            table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
            self._rows = {}
            if table is not None:
                for index in self.groups[group]:
                    rows = table.filter(pc.equal(table["file"], index))["row"].to_numpy()
                    self._rows[index] = np.sort(rows)
            self._group = group
        return self._rows.get(file_index, np.array([], dtype=np.int64))

    def kept(self, file_index: int, offset: int, n_rows: int) -> np.ndarray | None:
        """Which of the rows ``offset`` to ``offset + n_rows`` of score file ``file_index`` are not
        training rows (a mask); None where all are kept."""
        dropped = self.rows_of(file_index)
        dropped = dropped[(dropped >= offset) & (dropped < offset + n_rows)]
        if not len(dropped):
            return None
        keep = np.ones(n_rows, dtype=bool)
        keep[dropped - offset] = False
        return keep


def find_training_rows(score_files: list[Path], training_ids: Path | None, folder: Path) -> TrainingRows:
    """The training rows among ``score_files`` (``TrainingRows``); none where ``training_ids`` is None.
    ``folder`` is emptied first; the caller removes it when the stage ends."""
    if training_ids is None or not score_files:
        return TrainingRows.none()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    buckets = hash_buckets()
    groups = [
        range(int(c[0]), int(c[-1]) + 1)
        for c in np.array_split(np.arange(len(score_files)), buckets)
        if len(c)
    ]
    task = ray.remote(_training_rows_in_bucket).options(**READ_TASK)
    files = [str(path) for path in score_files]
    bounds = [(g.start, g.stop) for g in groups]
    ray.get([task.remote(b, buckets, str(training_ids), files, bounds, str(folder)) for b in range(buckets)])
    return TrainingRows(folder, groups)


def _training_rows_in_bucket(
    bucket: int, buckets: int, training_ids: str, files: list[str], groups: list[tuple[int, int]], folder: str
) -> None:
    """Write ``folder/group-G/bucket-B.parquet`` (file, row) for the rows of the score files in group G
    whose id is one of this bucket's training ids."""
    mine = [
        ids.filter(pa.array(id_buckets(ids, buckets) == bucket))
        for batch in pq.ParquetFile(training_ids).iter_batches(ID_BATCH_ROWS, columns=["id"])
        for ids in [batch.column("id").cast(pa.string())]
    ]
    trained = pc.unique(pa.concat_arrays(mine)) if mine else pa.array([], pa.string())
    if len(trained) == 0:
        return
    for group, (start, stop) in enumerate(groups):
        found_files, found_rows = [], []
        for index in range(start, stop):
            offset = 0
            for batch in pq.ParquetFile(files[index]).iter_batches(ID_BATCH_ROWS, columns=["id"]):
                hits = np.flatnonzero(
                    pc.is_in(batch.column("id"), value_set=trained).to_numpy(zero_copy_only=False)
                )
                found_files.append(np.full(len(hits), index, dtype=np.int64))
                found_rows.append(hits + offset)
                offset += batch.num_rows
        if sum(len(rows) for rows in found_rows):
            out = Path(folder) / f"group-{group}"
            out.mkdir(exist_ok=True)
            table = pa.table({"file": np.concatenate(found_files), "row": np.concatenate(found_rows)})
            pq.write_table(table, out / f"bucket-{bucket}.parquet")

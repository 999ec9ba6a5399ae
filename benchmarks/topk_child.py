"""One top-k run of ``stage2_throughput.py`` (b), in its own process so its peak memory is its own.

    .venv/bin/python benchmarks/topk_child.py stream|pandas SCORES_DIR N_FILES K BATCH_ROWS

Reads the first N_FILES Parquet files of SCORES_DIR and keeps the best K rows (score desc, id asc):
``stream`` = ``selectmoe.select.topk.top_k`` over batches of BATCH_ROWS rows (as stage 2 streams its score
files), ``pandas`` = everything read into one DataFrame and sorted. Prints one JSON line: seconds, peak
RSS growth during the work (Linux VmHWM, reset after the imports), the peak of Arrow's memory pool (what
Arrow had allocated at most, without the allocator's retained pages), and a digest of the chosen ids.
Only pyarrow, pandas and ``selectmoe.select.topk`` are imported, to keep the process small.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from selectmoe.select.topk import top_k


def rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def main(method: str, folder: str, n_files: str, k: str, batch_rows: str) -> None:
    files = sorted(Path(folder).glob("*.parquet"))[: int(n_files)]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss_before = rss_kib("VmRSS")
    start = time.perf_counter()
    if method == "stream":
        batches = (
            pa.Table.from_batches([b])
            for f in files
            for b in pq.ParquetFile(f).iter_batches(int(batch_rows), columns=["id", "dataset", "score"])
        )
        ids = top_k(batches, int(k))["id"].to_pylist()
    elif method == "pandas":
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        ids = frame.sort_values(["score", "id"], ascending=[False, True]).head(int(k))["id"].tolist()
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    growth_mib = (rss_kib("VmHWM") - rss_before) / 1024
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    arrow_mib = pa.default_memory_pool().max_memory() / 2**20
    print(
        json.dumps(
            {"seconds": seconds, "peak_rss_delta_mib": growth_mib, "arrow_peak_mib": arrow_mib, "ids": digest}
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])

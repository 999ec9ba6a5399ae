"""Selections over streamed score tables: top-k, per-dataset quotas, diversity, random, filtered random,
threshold, similarity to target tasks.

Every method is exact at any corpus size. ``top_k`` / ``per_dataset_k`` / ``random`` keep only the
current best ``k`` rows while batches stream past (driver memory O(k + batch)); ``threshold`` keeps
what it selects. ``diversity`` clusters routing features and needs them for every candidate row
(O(rows x layers x experts)), as the seed's k-means did. ``similarity`` keeps each target task's
best ``k`` rows (O(k x tasks)).

Order is total and deterministic: score descending, ties broken by id ascending. ``random`` orders by
a seeded hash of the id instead of the score, so it is the same sample for the same seed;
``filtered_random`` draws the same way, per dataset at the corpus's mix, among the rows at or above
their dataset's score threshold; with reply strata (``with_reply_strata``) each frequent reply of a dataset
has a threshold and a share of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selectmoe.data.subset import random_key

# selection.strata=reply: a reply is a stratum of its own when at least this share of its dataset's sampled
# rows, and at least this many of them, give it
REPLY_STRATUM_SHARE = 0.01
REPLY_STRATUM_ROWS = 5
SILHOUETTE_ROWS = 2000  # rows the auto_k silhouette is measured on (O(rows^2) distances)
_ORDER = [("score", "descending"), ("id", "ascending")]


def selection_size(n_rows: int, percentage: float, count: int = 0) -> int:
    """``count`` when set, else ``int(percentage * n_rows)`` (the seed's rule), at least 1 if any row."""
    if count > 0:
        return min(count, n_rows)
    return min(n_rows, max(1 if n_rows else 0, int(percentage * n_rows)))


def top_k(batches: Iterable[pa.Table], k: int, order=None) -> pa.Table:
    """The first ``k`` rows of all batches under ``order`` (default: score desc, id asc), streaming."""
    order = order or _ORDER
    best: pa.Table | None = None
    for batch in batches:
        merged = batch if best is None else pa.concat_tables([best, batch.select(best.column_names)])
        best = merged.take(pc.sort_indices(merged, sort_keys=order)[:k])
    return best if best is not None else pa.table({})


def random_k(batches: Iterable[pa.Table], k: int, seed: int) -> pa.Table:
    keyed = (b.append_column("random_key", random_key(seed, b["id"])) for b in batches)
    chosen = top_k(keyed, k, order=[("random_key", "ascending"), ("id", "ascending")])
    return chosen.drop_columns(["random_key"]) if chosen.num_columns else chosen


def dataset_thresholds(scores: dict[str, np.ndarray], keep_fraction: float) -> dict[str, float]:
    """Per dataset, the lowest score among its best ``keep_fraction`` of ``scores`` (rows at or above it
    are kept: at least that share of the dataset, more on ties)."""
    thresholds = {}
    for name, values in scores.items():
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        thresholds[name] = float(ordered[int(np.floor((1 - keep_fraction) * len(ordered)))])
    return thresholds


def above_dataset_thresholds(batches: Iterable[pa.Table], thresholds: dict[str, float]) -> Iterator[pa.Table]:
    """The rows whose score is at or above their dataset's threshold (a dataset without one keeps all)."""
    for batch in batches:
        floor = [thresholds.get(name, -np.inf) for name in batch["dataset"].to_pylist()]
        yield batch.filter(pc.greater_equal(batch["score"], pa.array(floor, pa.float64())))


def frequent_replies(datasets: list[str], reply_hashes: list[int]) -> set[tuple[str, int]]:
    """(dataset, reply hash) of each reply that at least ``REPLY_STRATUM_SHARE`` of the dataset's rows
    (here: a sample of them), and ``REPLY_STRATUM_ROWS`` rows, give: an answer label such as BBH's
    ``(A)`` or ``Yes``. Free-form replies rarely repeat, so such a dataset has none."""
    rows = Counter(datasets)
    given = Counter(zip(datasets, reply_hashes))
    return {
        (name, reply)
        for (name, reply), n in given.items()
        if n >= max(REPLY_STRATUM_ROWS, REPLY_STRATUM_SHARE * rows[name])
    }


def reply_stratum(dataset: str, reply_hash: int) -> str:
    return f"{dataset} [reply {reply_hash:016x}]"


def with_reply_strata(batch: pa.Table, frequent: set[tuple[str, int]]) -> pa.Table:
    """``batch`` with its ``dataset`` column the row's stratum: ``reply_stratum`` for a ``frequent`` reply
    of its dataset, else the dataset; the dataset itself moves to ``source_dataset`` (``without_strata``
    puts it back)."""
    datasets = batch["dataset"].to_pylist()
    strata = [
        reply_stratum(name, reply) if (name, reply) in frequent else name
        for name, reply in zip(datasets, batch["reply_hash"].to_pylist())
    ]
    at = batch.schema.get_field_index("dataset")
    return batch.set_column(at, "dataset", pa.array(strata, pa.string())).append_column(
        "source_dataset", pa.array(datasets, pa.string())
    )


def without_strata(table: pa.Table) -> pa.Table:
    """``with_reply_strata`` undone: the ``dataset`` column holds each row's dataset again."""
    if table.num_columns == 0:
        return table
    at = table.schema.get_field_index("dataset")
    return table.set_column(at, "dataset", table["source_dataset"]).drop_columns(["source_dataset"])


def per_dataset_k(batches: Iterable[pa.Table], quotas: dict[str, int], order=None) -> pa.Table:
    """The first rows of each dataset under ``order`` (default: score desc, id asc), ``quotas[dataset]``
    of them; datasets without a quota get none."""
    order = order or _ORDER
    best: dict[str, pa.Table] = {}
    for batch in batches:
        for name, quota in quotas.items():
            rows = batch.filter(pc.equal(batch["dataset"], name))
            if rows.num_rows == 0 or quota <= 0:
                continue
            merged = (
                rows
                if name not in best
                else pa.concat_tables([best[name], rows.select(best[name].column_names)])
            )
            best[name] = merged.take(pc.sort_indices(merged, sort_keys=order)[:quota])
    if not best:
        return pa.table({})
    return order_by_score(pa.concat_tables([best[name] for name in sorted(best)]))


def random_per_dataset_k(batches: Iterable[pa.Table], quotas: dict[str, int], seed: int) -> pa.Table:
    """A seeded random ``quotas[dataset]`` rows of each dataset (the ``random`` order, per dataset)."""
    keyed = (b.append_column("random_key", random_key(seed, b["id"])) for b in batches)
    chosen = per_dataset_k(keyed, quotas, order=[("random_key", "ascending"), ("id", "ascending")])
    return chosen.drop_columns(["random_key"]) if chosen.num_columns else chosen


def dataset_quotas(dataset_counts: dict[str, int], k: int, given: dict[str, float] | None) -> dict[str, int]:
    """Quotas per dataset: proportional to its rows (largest remainder, summing to ``k``), or ``given``
    as fractions of the dataset (< 1) or row counts (>= 1)."""
    if given:
        return {
            name: min(dataset_counts.get(name, 0), int(v * dataset_counts.get(name, 0)) if v < 1 else int(v))
            for name, v in given.items()
        }
    total = sum(dataset_counts.values())
    exact = {name: k * n / total for name, n in dataset_counts.items()} if total else {}
    quotas = {name: int(x) for name, x in exact.items()}
    leftover = k - sum(quotas.values())
    for name in sorted(exact, key=lambda n: (-(exact[n] - quotas[n]), n))[:leftover]:
        quotas[name] += 1
    return quotas


def above_threshold(batches: Iterable[pa.Table], threshold: float) -> pa.Table:
    kept = [b.filter(pc.greater_equal(b["score"], threshold)) for b in batches]
    kept = [b for b in kept if b.num_rows]
    return order_by_score(pa.concat_tables(kept)) if kept else pa.table({})


def order_by_score(table: pa.Table) -> pa.Table:
    if table.num_columns == 0:  # nothing was selected (no batches)
        return table
    return table.take(pc.sort_indices(table, sort_keys=_ORDER))


def with_rank(table: pa.Table) -> pa.Table:
    """Rank 1..n in the table's order."""
    return table.append_column("rank", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def column_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column, or a column of equal-length lists or tensors (``layer_scores``, ``embedding``)
    as (rows, length)."""
    values = column.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        return np.stack(values) if len(values) else np.zeros((0, 0))
    return values


# ---------------------------------------------------------------------------- similarity (RDS+)


def similarity_select(batches: Iterable[pa.Table], targets: dict[str, np.ndarray], k: int) -> pa.Table:
    """Target-aware selection as RDS+ does it (Ivison et al. 2025, round-robin over tasks, max over a
    task's examples): a row's score for a task is its highest cosine similarity to that task's example
    embeddings; the tasks, in name order, take turns picking their best row not yet picked, until ``k``
    rows are. Streaming and exact: each task keeps its ``k`` best rows (driver memory O(k x tasks)),
    enough for any turn order. Returns id, dataset, score (the similarity it was picked with) and
    ``target_task``, in picking order.

    Similarities are computed in float64 and rounded to float32: BLAS gives a row's dot product last-bit
    differences in differently sized batches, and the rounding keeps them from reordering rows (equal
    rows tie and are ordered by id)."""
    units = {task: _unit_rows(np.asarray(e, dtype=np.float64)) for task, e in sorted(targets.items())}
    best: dict[str, pa.Table] = {}
    for batch in batches:
        if batch.num_rows == 0:
            continue
        rows = _unit_rows(column_matrix(batch["embedding"]).astype(np.float64))
        keys = batch.select(["id", "dataset"])
        for task, examples in units.items():
            similarity = (rows @ examples.T).max(axis=1).astype(np.float32)  # see the docstring
            scored = keys.append_column("score", pa.array(similarity.astype(np.float64), pa.float64()))
            merged = scored if task not in best else pa.concat_tables([best[task], scored])
            best[task] = merged.take(pc.sort_indices(merged, sort_keys=_ORDER)[:k])
    queues = {task: best[task].to_pylist() for task in units if task in best}
    depth = dict.fromkeys(queues, 0)
    picked: set[str] = set()
    chosen: list[dict] = []
    while len(chosen) < k and any(depth[task] < len(queue) for task, queue in queues.items()):
        for task, queue in queues.items():
            while depth[task] < len(queue) and queue[depth[task]]["id"] in picked:
                depth[task] += 1
            if depth[task] < len(queue) and len(chosen) < k:
                row = queue[depth[task]]
                picked.add(row["id"])
                chosen.append({**row, "target_task": task})
                depth[task] += 1
    if not chosen:
        return pa.table({})
    return pa.Table.from_pylist(
        chosen,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("dataset", pa.string()),
                ("score", pa.float64()),
                ("target_task", pa.string()),
            ]
        ),
    )


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


# ---------------------------------------------------------------------------- diversity (k-means)


def routing_features(table: pa.Table) -> np.ndarray:
    """(rows, layers x experts) unit vectors: the rows' mean routing distributions."""
    return _unit_rows(column_matrix(table["routing"]).astype(np.float64))


def diversity_select(table: pa.Table, k: int, n_clusters: int, max_iters: int, seed: int, restarts: int = 3):
    """Cluster the rows' routing features (cosine k-means, k-means++ init, seeded restarts that differ),
    then take rows round-robin across clusters in score order until ``k`` are chosen.

    Returns (selected table in selection order, cluster label per row of ``table``)."""
    features = routing_features(table)
    n_clusters = max(1, min(n_clusters, len(features)))
    labels = best_kmeans(features, n_clusters, max_iters, seed, restarts)
    ranked = pc.sort_indices(table, sort_keys=_ORDER).to_numpy()
    queues = [[i for i in ranked if labels[i] == c] for c in range(n_clusters)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(k, len(table)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < k:
                chosen.append(queue[depth])
        depth += 1
    return table.take(pa.array(chosen, type=pa.int64())), labels


def choose_n_clusters(
    features: np.ndarray, k_range: tuple[int, int], max_iters: int, seed: int, restarts: int = 3
) -> tuple[int, dict[int, float]]:
    """``clustering_params.auto_k``: the k in ``k_range`` (inclusive) whose clustering has the highest
    mean cosine silhouette, measured on a seeded sample of at most ``SILHOUETTE_ROWS`` rows (ties: the
    smaller k). Returns (k, {k: silhouette})."""
    low, high = k_range
    high = min(high, len(features) - 1)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.permutation(len(features))[:SILHOUETTE_ROWS])
    scores: dict[int, float] = {}
    for n_clusters in range(max(2, low), high + 1):
        labels = best_kmeans(features, n_clusters, max_iters, seed, restarts)
        scores[n_clusters] = cosine_silhouette(features[sample], labels[sample])
    if not scores:  # fewer rows than the smallest k: one cluster per row at most
        return max(1, min(low, len(features))), {}
    best = max(scores, key=lambda n: (scores[n], -n))
    return best, scores


def cosine_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance (1 - x.y on unit vectors); a row alone in its cluster
    counts 0, as in scikit-learn."""
    distance = 1.0 - x @ x.T  # (n, n)
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return 0.0
    mean_to = np.stack([distance[:, labels == c].mean(axis=1) for c in clusters], axis=1)  # (n, C)
    sizes = np.array([(labels == c).sum() for c in clusters])
    own = np.searchsorted(clusters, labels)
    n_own = sizes[own]
    a = mean_to[np.arange(len(x)), own] * n_own / np.maximum(n_own - 1, 1)  # leave the row itself out
    mean_to[np.arange(len(x)), own] = np.inf
    b = mean_to.min(axis=1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def best_kmeans(
    features: np.ndarray, n_clusters: int, max_iters: int, seed: int, restarts: int
) -> np.ndarray:
    """Labels of the restart with the highest total cosine similarity; restart r uses seed + r
    (the seed project reset one seed before every restart, so all its restarts were the same)."""
    best_labels, best_fit = None, -np.inf
    for restart in range(restarts):
        labels, fit = _kmeans(features, n_clusters, max_iters, np.random.default_rng(seed + restart))
        if fit > best_fit:
            best_labels, best_fit = labels, fit
    return best_labels


def _kmeans(x: np.ndarray, n_clusters: int, max_iters: int, rng: np.random.Generator):
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n_clusters):  # k-means++ with cosine distance
        distance = 1 - np.max(x @ np.stack(centres).T, axis=1)
        p = distance.clip(min=0)
        centres.append(x[rng.choice(len(x), p=p / p.sum())] if p.sum() > 0 else x[rng.integers(len(x))])
    centres = np.stack(centres)
    labels = np.full(len(x), -1)
    for _ in range(max_iters):
        new_labels = np.argmax(x @ centres.T, axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(n_clusters):
            members = x[labels == c]
            if len(members):
                centre = members.sum(axis=0)
                centres[c] = centre / max(np.linalg.norm(centre), 1e-12)
    fit = float(np.sum(np.max(x @ centres.T, axis=1)))
    return labels, fit

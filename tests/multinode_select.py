"""``selectmoe select`` on a three-node Ray cluster simulated on this machine (``ray.cluster_utils``):
run by ``tests/test_cluster.py`` in a process of its own, so the test session's Ray is untouched.

    python tests/multinode_select.py MODEL DATA WORK

1. an uninterrupted run into WORK/whole, recording on which nodes the scan tasks and the scoring actors
   ran (Ray's State API);
2. the same run into WORK/killed, with a worker node that holds a scoring actor removed (its raylet and
   workers killed) as soon as the first score file is written; rerun (resumed) until it finishes.

Writes WORK/report.json; the test reads the outputs themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

NODE_CPUS = 2
SCORE_FILES = "scores"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _select(model: str, data: str, out: Path):
    from selectmoe.config import parse_config
    from selectmoe.select import select

    overrides = {
        "selector_model.path": model,
        "dataset.data_path": data,
        "output_dir": str(out),
        "dataset.max_sequence_length": 128,
        "selection_percentage": 0.1,
        "scoring.sort_window": 16,  # many blocks: scoring is still running when a node is removed
    }
    return select(parse_config("select", overrides=[f"{k}={v}" for k, v in overrides.items()]))


def _scoring_actors(before: set[str] = frozenset(), alive: bool = False) -> list:
    """The scoring actors Ray's State API lists, those in ``before`` (a previous run's) left out."""
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive else None
    actors = list_actors(filters=filters, limit=10_000, raise_on_missing_output=False)
    return [a for a in actors if "GateScorer" in a.class_name and a.actor_id not in before]


def _placements() -> dict:
    """Node ids where the scan tasks ran and where the scoring actors lived, and the actor ids seen."""
    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("name", "=", "_scan_piece")], limit=10_000, raise_on_missing_output=False)
    actors = _scoring_actors()
    return {
        "scan": sorted({t.node_id for t in tasks if t.node_id}),
        "scoring_actors": sorted({a.node_id for a in actors if a.node_id}),
        "actor_ids": sorted(a.actor_id for a in actors),
    }


def main(model: str, data: str, work: Path) -> None:
    # a temp dir of its own, short (Ray's Unix sockets live under it); RAY_TMPDIR also moves the address
    # file the cluster writes (ray_current_cluster) out of /tmp/ray, so a plain ray.init() elsewhere,
    # even after a crash of this script, starts its own Ray instead of joining (a dead) this one
    temp_dir = tempfile.mkdtemp(prefix="smoe-nodes-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    ray_dir = os.path.join(temp_dir, "ray")  # what Ray makes of RAY_TMPDIR; the nodes' sessions too
    os.makedirs(ray_dir)
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": NODE_CPUS, "object_store_memory": 128 * 1024**2, "temp_dir": ray_dir}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": True, "dashboard_port": _free_port()},  # State API
    )
    workers = [cluster.add_node(**node) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report: dict = {"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
    try:
        started = time.monotonic()
        _select(model, data, work / "whole")
        report["whole"] = _placements()
        report["whole_s"] = round(time.monotonic() - started, 1)

        # the first run's actors release their CPUs: the second run gets as many actors, on every node
        # (under load that can take minutes; with fewer free CPUs the pool can be one actor on the head node)
        deadline = time.monotonic() + 300
        while ray.available_resources().get("CPU", 0) < 3 * NODE_CPUS and time.monotonic() < deadline:
            time.sleep(0.5)
        report["free_cpus_before_killed"] = ray.available_resources().get("CPU", 0)

        killed = work / "killed"
        removed = threading.Event()
        whole_actors = set(report["whole"]["actor_ids"])
        scoring_nodes: set[str] = set()  # the latest lookup's

        def look_up_scoring_nodes():
            """The State API answers slowly, and under load it times out: the lookups run beside the file
            watch, so the node goes within ~10 ms of the first score file whatever they take."""
            nonlocal scoring_nodes
            while not removed.is_set():
                try:
                    scoring_nodes = {a.node_id for a in _scoring_actors(whole_actors, alive=True)}
                except Exception as error:  # a timed-out lookup: the next one may answer
                    report.setdefault("lookup_errors", []).append(repr(error)[:300])
                time.sleep(0.5)

        def remove_a_scoring_node():
            """Remove a worker node right after the first score file is written: one the lookups saw holding
            a scoring actor of this run, or, where they have not answered yet (scoring takes ~2 s on a fast
            CPU), the first worker node. That one holds an actor too: with 6 CPUs free the pool is 5
            actors of 1 CPU each (``_pool_args``), and the other two nodes hold at most 4."""
            while not removed.is_set():
                files = list((killed / SCORE_FILES).glob("*.parquet"))
                if files:
                    node = ([w for w in workers if w.node_id in scoring_nodes] or workers)[0]
                    report["scoring_nodes_at_kill"] = sorted(scoring_nodes)
                    report["score_files_at_kill"] = len(files)
                    report["killed_node"] = node.node_id
                    cluster.remove_node(node, allow_graceful=False)
                    removed.set()
                    return
                time.sleep(0.01)

        threads = [
            threading.Thread(target=t, daemon=True) for t in (look_up_scoring_nodes, remove_a_scoring_node)
        ]
        for thread in threads:
            thread.start()
        runs = []
        started = time.monotonic()
        for _ in range(3):
            try:
                _select(model, data, killed)
                runs.append("finished")
                break
            except Exception:  # the lost node's work: resumed by the next run
                runs.append(traceback.format_exc(limit=3)[-1500:])
        removed.set()
        for thread in threads:
            thread.join(timeout=60)
        report["killed_runs"] = runs
        report["killed_s"] = round(time.monotonic() - started, 1)
    finally:
        (work / "report.json").write_text(json.dumps(report, indent=2))
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))

"""cluster_configs/: Ray's own schema for the launcher YAMLs, the KubeRay manifests' structure,
the runtime env, and a real `ray job submit` to a local head with token auth on."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import SHARED_TRAIN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
LAUNCHER_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
VENV_BIN = Path(sys.executable).parent  # the head and the job's `python` use this interpreter
OASST = SHARED_TRAIN / "oasst1.jsonl"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _load_docs(name: str) -> dict[str, dict]:
    """A multi-document manifest, keyed by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((CONFIGS / name).read_text()) if doc}


# ---------------------------------------------------------------------------- launcher YAMLs


def _validate_launcher(config: dict) -> dict:
    """What `ray up` checks before it talks to a cloud: defaults merged, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_schema(name):
    config = _load(name)
    prepared = _validate_launcher(config)

    node_types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    workers = {k: v for k, v in node_types.items() if k != head}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert all(v["max_workers"] >= v.get("min_workers", 0) for v in workers.values())
    key = {"aws": "InstanceType", "gcp": "machineType"}[config["provider"]["type"]]
    assert all(key in v["node_config"] for v in node_types.values())  # Ray leaves node_config unchecked

    # the nodes run the client's Ray version, with token auth, and get the client's token
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in cmd and "selectmoe" in cmd for cmd in config["setup_commands"])

    # the project's mounts exist (paths relative to the project root, where `ray up` runs)
    # and never include the root itself: `ray up` hashes mounted folders, .venv/ included
    project = [local for local in config["file_mounts"].values() if not local.startswith("~")]
    assert project and all((ROOT / local).exists() for local in project)
    assert all((ROOT / local).resolve() != ROOT for local in project)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(setup_comands=c.pop("setup_commands")),  # top-level typo
        lambda c: next(iter(c["available_node_types"].values())).update(min_worker=1),  # node-type typo
        lambda c: c["docker"].update(pull_befor_run=True),  # docker typo
        lambda c: c.update(head_node_type="no-such-type"),
    ],
    ids=["top-level", "node-type", "docker", "head-type"],
)
def test_launcher_schema_rejects_typos(break_it):
    config = _load("aws-gpu.yaml")
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher(config)


# ---------------------------------------------------------------------------- KubeRay manifests


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] and head_container["resources"]["limits"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}

    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == head_container["image"]  # one Python environment everywhere
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/mnt/shared", "/dev/shm"} <= mounts


@pytest.mark.timeout(60)
def test_kuberay_raycluster_manifest():
    docs = _load_docs("kuberay-raycluster.yaml")
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    _check_ray_cluster_spec(cluster["spec"])
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.timeout(60)
def test_kuberay_rayjob_manifest():
    from ray.runtime_env import RuntimeEnv

    from selectmoe.config import STAGE_CONFIGS, build, parse_overrides

    job = _load_docs("kuberay-rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])

    # the entrypoint is the pipeline with keys `selectmoe pipeline` accepts
    words = spec["entrypoint"].split()
    assert words[:3] == ["python", "-m", "ray_jobs.pipeline"]
    cfg = build(STAGE_CONFIGS["pipeline"], parse_overrides(words[3:]))
    assert cfg.output_dir.startswith("/mnt/shared/")  # on the volume every pod mounts

    # the inline runtime env is Ray-valid and carries runtime_env.yaml's variables
    inline = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**inline)
    assert inline["env_vars"] == _load("runtime_env.yaml")["env_vars"]


@pytest.mark.timeout(60)
def test_runtime_env_yaml_is_a_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    runtime_env = _load("runtime_env.yaml")
    assert set(runtime_env) <= RuntimeEnv.known_fields  # RuntimeEnv ignores unknown keys
    RuntimeEnv(**runtime_env)  # type-checks each known field
    assert ".venv/" in runtime_env["excludes"] and ".git/" in runtime_env["excludes"]
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


# ---------------------------------------------------------------------------- job submission


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray_env(token_path: Path) -> dict[str, str]:
    """The caller's environment minus its Ray settings (RAY_ADDRESS, ...), plus token auth and the
    venv first on PATH. Only subprocesses get it: this process's local Ray session is untouched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """Stop one head without `ray stop` (which kills every Ray on the machine): the processes
    `ray start` left in its own process group, plus their descendants (workers start their own
    sessions under the raylet). SIGTERM, then SIGKILL what is left after the grace period."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                procs[proc.pid] = proc
                procs.update((child.pid, child) for child in proc.children(recursive=True))
        except (ProcessLookupError, psutil.Error):
            continue
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


@pytest.fixture
def ray_head():
    """A separate local Ray head (2 CPUs, dashboard on a free port, its own temp dir and token),
    stopped in teardown whatever happens. Yields (job API address, client env, temp dir)."""
    # A temp dir of its own also keeps this head's address file (ray_current_cluster) out of
    # /tmp/ray, so a plain ray.init() elsewhere starts its own Ray instead of joining this head.
    # Short path: Ray's Unix sockets live under it and must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="smoe-head-", dir="/tmp"))
    token_path = tmp / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    env = _ray_env(token_path)
    gcs, dashboard, client, agent = _free_ports(4)
    log = (tmp / "ray_start.log").open("w")
    # its own session (process group): the handle teardown uses to stop this head and nothing else
    start = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--num-cpus=2",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--object-store-memory={256 * 1024**2}",
            f"--temp-dir={tmp / 'ray'}",
            "--disable-usage-stats",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = start.wait(timeout=120)
        assert rc == 0, (tmp / "ray_start.log").read_text()[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_api(address, env, timeout_s=60)
        yield address, env, tmp
    finally:
        if start.poll() is None:
            start.kill()
        _stop_process_group(start.pid)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_job_api(address: str, env: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        listed = _ray(["job", "list", "--address", address], env, timeout=30)
        if listed.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"job API at {address} not ready:\n{listed.stderr[-2000:]}")
        time.sleep(1)


@pytest.mark.timeout(300)
def test_ray_job_submit_validate_data(ray_head):
    address, env, tmp = ray_head

    # auth is on: a client with the wrong token is turned away
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    assert _ray(["job", "list", "--address", address], wrong, timeout=60).returncode != 0

    # the shipped runtime env, except HF_HOME: its /mnt/shared path is the cluster's shared storage
    runtime_env = _load("runtime_env.yaml")
    runtime_env["env_vars"]["HF_HOME"] = str(tmp / "hf_home")
    out = tmp / "validate"
    submission_id = f"selectmoe-test-{secrets.token_hex(4)}"
    submitted = _ray(
        [
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            submission_id,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "ray_jobs.validate_data",
            f"dataset.data_path={OASST}",
            f"output_dir={out}",
        ],
        env,
        timeout=200,
    )
    logs = submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert submitted.returncode == 0, logs
    status = _ray(["job", "status", "--address", address, submission_id], env, timeout=60)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, logs

    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["stage"] == "validate-data" and manifest["status"] == "finished"
    assert counts["rows_read"] == counts["rows_accepted"] + counts["rows_rejected"] > 0

    # the uploaded package is the project's code: .gitignore'd and excluded paths stayed home
    unpacked = tmp / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    (package,) = [p for p in unpacked.iterdir() if p.is_dir()]  # beside it: the zip's .lock file
    shipped = {p.name for p in package.iterdir()}
    assert {"selectmoe", "ray_jobs", "pyproject.toml"} <= shipped
    assert not shipped & {".venv", ".git", "outputs"}


# ---------------------------------------------------------------------------- several nodes


@pytest.mark.timeout(600)
def test_select_on_three_nodes_spreads_and_a_node_killed_mid_scoring_loses_no_row(tiny_olmoe, tmp_path):
    """A user's ``select`` on a cluster, with no key changed: three Ray nodes simulated on this machine
    (``tests/multinode_select.py``, a process of its own, token auth on). The scan tasks and the
    scoring actors run on every node; the selection is the exact top of the score files the nodes
    wrote; with a worker node removed mid-scoring (raylet and workers killed) no row is lost or scored
    twice, and the selection is byte-identical to the uninterrupted run's."""
    rows = tmp_path / "rows"  # 6 files of real rows: scan pieces for every node; ~20 score files
    rows.mkdir()
    lines = (SHARED_TRAIN / "human_instructions.jsonl").read_text().splitlines()
    for part in range(6):
        (rows / f"part{part}.jsonl").write_text("\n".join(lines[part::6]) + "\n")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("multinode_select.py")),
            str(tiny_olmoe),
            str(rows),
            str(work),
        ],
        env=_ray_env(token),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    nodes = set(report["nodes"])
    assert len(nodes) == 3
    assert set(report["whole"]["scan"]) == nodes and set(report["whole"]["scoring_actors"]) == nodes

    import pyarrow.parquet as pq

    scores = {}
    for run in ("whole", "killed"):
        table = pq.read_table(work / run / "scores", columns=["id", "score"])
        ids = table["id"].to_pylist()
        assert len(ids) == len(set(ids)), run  # no row scored twice
        scores[run] = dict(zip(ids, table["score"].to_pylist()))
    assert set(scores["killed"]) == set(scores["whole"])  # no row lost
    selected = [json.loads(line) for line in (work / "whole" / "selected.jsonl").read_text().splitlines()]
    best = sorted(scores["whole"].items(), key=lambda item: (-item[1], item[0]))[: len(selected)]
    assert [r["id"] for r in selected] == [row_id for row_id, _ in best]  # the exact top-k

    # a worker node holding a scoring actor was removed while score files were still to come
    assert "killed_node" in report, report
    # seen by the State API, or held one by count: 5 one-CPU actors, at most 4 on the two other nodes
    assert (
        report["killed_node"] in report["scoring_nodes_at_kill"] or report["free_cpus_before_killed"] == 6
    ), report
    assert 0 < report["score_files_at_kill"] < len(list((work / "killed" / "scores").glob("*.parquet")))
    assert report["killed_runs"][-1] == "finished", report["killed_runs"]
    for name in ("selected.jsonl", "selected.parquet"):
        assert (work / "killed" / name).read_bytes() == (work / "whole" / name).read_bytes(), name

"""``manifest.json``: what a stage ran with, what it read, what it wrote.

Every stage ends by calling ``write_manifest`` in its ``output_dir``. The manifest holds the
resolved config, input fingerprints, counts, metrics and package versions; the pipeline compares
manifests to decide whether a stage can be skipped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from selectmoe.config import save_config, to_dict
from selectmoe.layout import MANIFEST

_PACKAGES = ("selectmoe", "torch", "transformers", "peft", "ray", "lm_eval", "pyarrow")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found


def fingerprint(path: str | Path, chunk: int = 1 << 20) -> dict[str, Any]:
    """Size + sha256 of a file (first and last MiB for large files), or of a folder's file list."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        digest = hashlib.sha256()
        for f in files:
            digest.update(str(f.relative_to(p)).encode())
            digest.update(fingerprint(f)["sha256"].encode())
        return {"path": str(p), "files": len(files), "sha256": digest.hexdigest()}
    if not p.exists():  # URIs and hub ids are recorded by name only
        return {"path": str(path)}
    size = p.stat().st_size
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        if size <= 4 * chunk:
            digest.update(fh.read())
        else:
            digest.update(fh.read(chunk))
            fh.seek(size - chunk)
            digest.update(fh.read(chunk))
            digest.update(str(size).encode())
    return {"path": str(p), "bytes": size, "sha256": digest.hexdigest()}


def hash_dict(data: dict[str, Any]) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_hash(cfg: Any) -> str:
    """Stable hash of a resolved config (pipeline resume compares these)."""
    return hash_dict(to_dict(cfg))


def write_manifest(
    output_dir: str | Path,
    *,
    stage: str,
    config: Any,
    inputs: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    started_at: float | None = None,
) -> Path:
    """Write ``manifest.json`` (and the resolved ``config.yaml``) into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    now = time.time()
    manifest = {
        "stage": stage,
        "status": "finished",
        "config_hash": config_hash(config),
        "config": to_dict(config),
        "inputs": inputs or {},
        "counts": counts or {},
        "metrics": metrics or {},
        "outputs": outputs or {},
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "seconds": round(now - started_at, 3) if started_at else None,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())

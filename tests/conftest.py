"""Shared test fixtures: one local Ray session and the offline tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, and each state change of a run
# (start, running, finished) waits for a poll: ~9 s of every tiny run here. Poll faster in this
# process and in the Rays, drivers and benchmarks it starts (they inherit the environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# the real rows beside the project (../shared/data/train); read in place, never copied
SHARED_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run: 2 CPUs like the CI machine, small object store. The dashboard
    serves the State API that Ray Train's placement-group cleaner needs (see selectmoe.scaling)."""
    import ray

    from selectmoe.scaling import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory=512 * 1024**2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The offline 32k SentencePiece tokenizer (``selectmoe.demo.tiny``) saved once; pass it as a name."""
    from selectmoe.demo.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_olmoe(tmp_path_factory):
    """A tiny OLMoE (2 layers, hidden 64, 8 experts top-2) + the offline tokenizer, as an HF folder."""
    from selectmoe.demo.tiny import build_tiny_olmoe

    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64) + the offline tokenizer: the stage-3 target stand-in."""
    from selectmoe.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))

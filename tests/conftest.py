"""Shared fixtures: a local Ray cluster and the embedded model, started once per test session."""

import os

import pytest

# Quiet telemetry for this test process and the Ray workers it starts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    from flip_ray.model import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=None)
    yield ray
    ray.shutdown()

"""Shared fixtures: a local Ray cluster and the embedded model, started once per test session."""

import os
import signal

import pytest

# Quiet telemetry for this test process and the Ray workers it starts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    from flip_ray.engine.embedded import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster, started after the S3 server so that its workers inherit the AWS
    variables, as workers on a real cluster get credentials from their node's environment."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1; its endpoint and keys are exported as AWS_* variables."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def restore_sigterm():
    """`flip_ray.cli.main` installs its SIGTERM handler; put pytest's back afterwards."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)

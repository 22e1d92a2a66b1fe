"""Shared fixtures: the environment Ray needs in tests, and Ray / Serve sessions per module.

A module that needs other `ray.init` arguments (a metrics export port, more CPUs) sets
`RAY_INIT = {...}` at module level, and `RAY_ENV = {...}` for environment variables its Ray
processes need; every integration module gets its own session.
"""

import logging
import os

import pytest

# Set before Ray or any model code is imported: Ray 2.60 turns token auth on for new local clusters.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests that need no particular model run on tiny-wan (4 steps, a VAE of a tenth the cost); the
# shipped default, shapes-wan, is tested where it is named (test_shapes, the preset matrix, the
# example configs).
os.environ.setdefault("KINORAY_MODEL", "tiny-wan")
# moto's S3 server logs every request through werkzeug: failures would drown in it.
logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def ray_session(request):
    """A local Ray cluster for the module (8 logical CPUs unless the module's RAY_INIT says otherwise)."""
    import ray

    kwargs = {"num_cpus": 8, "include_dashboard": False, "log_to_driver": False}
    kwargs.update(getattr(request.module, "RAY_INIT", {}))
    with pytest.MonkeyPatch.context() as env:
        for key, value in getattr(request.module, "RAY_ENV", {}).items():
            env.setenv(key, value)
        ray.init(**kwargs)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_base(ray_session):
    """Ray Serve's HTTP proxy on a free loopback port: its base URL."""
    from helpers import free_port
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for the module: its endpoint URL."""
    from helpers import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Set before Ray starts, so the readers, stage and writer workers inherit them.
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    yield f"http://127.0.0.1:{port}"
    server.stop()

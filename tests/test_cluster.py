"""A bulk job on a real Ray cluster of two nodes (both on this machine, started with `ray start`),
with its prompt tables and output in object storage: through `kinoray batch --address` and as a
Ray Job submitted with `ray job submit --working-dir`."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from kinoray.models.video import probe_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "kinoray-cluster"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for part in range(2):
        rows = [{"id": f"p{part}-{i}", "prompt": f"cluster prompt {part} {i}", "seed": i} for i in range(3)]
        with fs.open(f"{BUCKET}/in/part-{part}.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    yield fs, env
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    _, s3_env = s3
    env = {
        **os.environ,
        **s3_env,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    gcs, dashboard = free_port(), free_port()
    common = ["--num-cpus=4", "--node-ip-address=127.0.0.1", "--object-store-memory=300000000"]
    ray = str(BIN / "ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            *common,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [ray, "start", f"--address=127.0.0.1:{gcs}", *common], env=env, check=True, capture_output=True
    )
    yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def assert_videos(fs, prefix):
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/{prefix}/videos"))
    assert names == [f"p{part}-{i}.mp4" for part in range(2) for i in range(3)]
    assert probe_video(fs.cat(f"{BUCKET}/{prefix}/videos/p0-0.mp4"))["frames"] == 9
    assert len(fs.ls(f"{BUCKET}/{prefix}/manifest")) == 1


def test_the_cluster_has_two_nodes(cluster):
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{cluster['address']}'); print(len([n for n in ray.nodes() if n['Alive']]))",
        ],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.stdout.strip().splitlines()[-1] == "2", res.stderr[-2000:]


def test_kinoray_batch_on_the_cluster(cluster, s3):
    fs, _ = s3
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kinoray.cli",
            "batch",
            f"s3://{BUCKET}/in/",
            "-o",
            f"s3://{BUCKET}/out-cli",
            "--address",
            cluster["address"],
        ],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rows: 6 ok" in res.stdout
    assert_videos(fs, "out-cli")


def test_a_ray_job_submitted_with_its_working_dir(cluster, s3):
    fs, _ = s3
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", "outputs", ".git", "*.mp4", ".mypy_cache"]}
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster["dashboard"],
            "--no-wait",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "kinoray.cli",
            "batch",
            f"s3://{BUCKET}/in/",
            "-o",
            f"s3://{BUCKET}/out-job",
        ],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster["dashboard"])
    deadline = time.time() + 400
    while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "rows: 6 ok" in logs
    assert_videos(fs, "out-job")

"""`kinoray serve` killed and started again on the same storage: no job is lost or left
`in_progress`, and nothing of the server is left running after it exits, whatever the signal."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests
import yaml
from helpers import SAME_VIDEO_DB, decoded, free_port, psnr

from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline
from kinoray.models.video import encode_video

pytestmark = pytest.mark.integration

SLOW = {"num_inference_steps": 60, "height": 96, "width": 96, "num_frames": 17}


def start(tmp_path, port):
    config = {
        "model": {"weights": "tiny-wan"},
        "serve": {"storage": str(tmp_path / "store"), "port": port},
        "ray": {"metrics_export_port": free_port()},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kinoray.cli", "serve", "--config", str(path)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("kinoray serve did not come up")


def tree(proc):
    """The server's process and every process under it (Ray's head, workers, agents)."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(procs, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.5)
    names = [" ".join(p.cmdline()[:2])[:80] for p in alive if p.is_running()]
    for p in alive:  # leave nothing behind for later modules either
        p.kill()
    raise AssertionError(f"{len(alive)} process(es) of the server still running: {names}")


def statuses(base, ids):
    return [requests.get(f"{base}/v1/videos/{i}", timeout=10).json() for i in ids]


def test_jobs_in_flight_survive_a_sigkill_and_nothing_is_left_running(tmp_path):
    """`on_restart: fail` is tested without a restart in tests/test_video_lifecycle.py."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(tmp_path, port)
    ids = [
        requests.post(f"{base}/v1/videos", json={"prompt": f"fox {i}", "seed": i, **SLOW}, timeout=10).json()[
            "id"
        ]
        for i in range(3)
    ]
    procs = tree(server)
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert_all_gone(procs)
    assert {j["status"] for j in statuses_from_store(tmp_path, ids)} <= {"queued", "in_progress"}

    again = start(tmp_path, port)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            jobs = statuses(base, ids)
            if all(j["status"] in ("completed", "failed") for j in jobs):
                break
            time.sleep(0.5)
        assert [j["status"] for j in jobs] == ["completed"] * 3, jobs
        # Run again from the start with its seed: the video the job would have made.
        got = requests.get(f"{base}/v1/videos/{ids[0]}/content", timeout=30).content
        local = LocalPipeline(KinorayConfig.model_validate({"model": {"weights": "tiny-wan"}}))
        ref = local.run([local.request(prompt="fox 0", seed=0, **SLOW)])["frames"][0]
        assert psnr(decoded(got), decoded(encode_video(ref, 8))) > SAME_VIDEO_DB
        assert requests.get(f"{base}/healthz", timeout=5).json()["jobs_in_flight"] == 0
    finally:
        procs = tree(again)
        again.send_signal(signal.SIGTERM)
        code = again.wait(timeout=90)
        assert_all_gone(procs)
    stderr = again.stderr.read()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr


def statuses_from_store(tmp_path, ids):
    import json

    return [json.loads((tmp_path / "store" / "jobs" / f"{i}.json").read_text()) for i in ids]

"""Faults lose nothing: a stage actor or replica killed mid-work, a bulk driver killed mid-job."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from kinoray.models.config import KinorayConfig
from kinoray.models.video import probe_video
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration


def kill_process(title_part):
    """SIGKILL the first process whose title (Ray sets it per actor) contains `title_part`."""
    for p in psutil.process_iter(["cmdline"]):
        if title_part in " ".join(p.info["cmdline"] or []):
            p.kill()
            return p.pid
    raise AssertionError(f"no process titled *{title_part}*")


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    return ray_session


def table(path, n, steps=12):
    path.write_text(
        "".join(
            json.dumps({"id": f"r{i:02d}", "prompt": f"fault {i}", "num_inference_steps": steps}) + "\n"
            for i in range(n)
        )
    )
    return str(path)


def assert_complete(out, n):
    rows = manifest.read(out).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"r{i:02d}" for i in range(n)]  # each row exactly once
    for r in rows:
        assert r["status"] == "ok", r
        assert probe_video(open(r["output"], "rb").read())["frames"] == r["num_frames"]
    leftovers = [p for p in os.listdir(os.path.join(out, "videos")) if p.startswith(".tmp")]
    assert not leftovers


def test_a_denoiser_actor_killed_mid_job(ray_cluster, tmp_path):
    config = KinorayConfig.model_validate(
        {"denoiser": {"batch_size": 2}, "encoder": {"batch_size": 2}, "decoder": {"batch_size": 2}}
    )
    killed = []

    def on_rows(n):
        if not killed:
            killed.append(kill_process("MapBatches(Denoiser)"))

    out = str(tmp_path / "out")
    summary = run_job(table(tmp_path / "p.jsonl", 16), out, config, progress=False, on_rows=on_rows)
    assert killed
    assert (summary.ok, summary.failed) == (16, 0)
    assert_complete(out, 16)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_command(prompts, out, config="examples/job.yaml"):
    return [
        sys.executable,
        "-m",
        "kinoray.cli",
        "batch",
        str(prompts),
        "-o",
        str(out),
        "--config",
        str(config),
        "--model",
        "tiny-wan",  # the example's pools; a model whose videos come fast enough to stop mid-job
    ]


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_a_stopped_job_keeps_every_video_it_wrote(tmp_path, sig):
    """Ctrl-C (SIGINT to the job's process group), SIGTERM to the job's process (what a container
    stop or `kill` sends) or SIGKILL of a 24-row job once 6 videos exist: the rerun generates
    exactly the rows without a video and ends like an uninterrupted run."""
    # The example's pools with one row per call: videos are written one by one rather than in
    # bursts of a block of rows (a burst can hold every row of a fast job), so the job is
    # stopped with most of its rows to go.
    rows = 24
    with open(os.path.join(ROOT, "examples", "job.yaml")) as f:
        job = yaml.safe_load(f)
    for stage in ("encoder", "denoiser", "decoder"):
        job[stage].update(batch_size=1, max_replicas=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"r{i:02d}",
                    "prompt": f"stop {i}",
                    "num_inference_steps": 8,
                    "height": 64,
                    "width": 64,
                }
            )
            + "\n"
            for i in range(rows)
        )
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        batch_command(prompts, out, config),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "videos").glob("*.mp4"))) < 6:
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    if sig == signal.SIGTERM:
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)  # as Ctrl-C does: the driver and the local Ray cluster it started
    stdout, stderr = proc.communicate(timeout=120)
    # Workers orphaned by a SIGKILL take a while to notice their raylet is gone: they are
    # stopped here, so that no video is written after the listing below.
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    written = {p.name: p.stat().st_mtime_ns for p in (out / "videos").glob("*.mp4")}
    if len(written) == rows:
        # The last rows were written before the signal took effect; this run had nothing left
        # to stop or resume (seen for SIGINT in the full suite, never alone).
        pytest.skip("the job finished before the signal could stop it")
    assert len(written) >= 6
    if sig != signal.SIGKILL:
        name = signal.Signals(sig).name
        assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], stderr[-2000:]
        lines = [
            line for line in stderr.splitlines() if line.strip() and "kinoray:" in line and "%|" not in line
        ]
        assert lines and lines[-1].startswith(f"kinoray: stopped by {name}"), stderr[-2000:]
        assert "Traceback" not in stderr and "SIGTERM received" not in stderr

    if sig == signal.SIGTERM:
        return  # it stops the job as SIGINT does; the rerun after that is checked there
    res = subprocess.run(
        batch_command(prompts, out, config), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"rows: {rows - len(written)} ok" in res.stdout, res.stdout
    assert {n: (out / "videos" / n).stat().st_mtime_ns for n in written} == written  # none made again
    assert_complete(str(out), rows)


def test_a_serve_replica_killed_with_requests_in_flight(serve_base, tmp_path):
    import openai
    from ray import serve

    from kinoray.deployments.app import build

    config = KinorayConfig.model_validate(
        {"serve": {"storage": str(tmp_path / "store"), "job_deadline_s": 120}}
    )
    serve.run(build(config), name="faults", route_prefix="/")
    client = openai.OpenAI(base_url=f"{serve_base}/v1", api_key="x", max_retries=0)
    ids = [
        client.videos.create(prompt=f"in flight {i}", extra_body={"num_inference_steps": 30, "seed": i}).id
        for i in range(4)
    ]
    while not any(
        client.videos.retrieve(i).status == "in_progress" and client.videos.retrieve(i).progress > 5
        for i in ids
    ):
        time.sleep(0.05)
    kill_process("ServeReplica:faults:denoiser")
    final = {}
    deadline = time.time() + 180
    while len(final) < len(ids) and time.time() < deadline:
        for i in ids:
            v = client.videos.retrieve(i)
            if v.status in ("completed", "failed"):
                final[i] = v
        time.sleep(0.2)
    assert len(final) == len(ids), "a job stayed in progress"
    for v in final.values():
        assert v.status == "completed" or (v.error and v.error.message), v
    assert sum(v.status == "completed" for v in final.values()) >= 1, [v.error for v in final.values()]

    # A restart of the whole application loses no finished video: records and files are in storage.
    done = next(i for i, v in final.items() if v.status == "completed")
    before = client.videos.download_content(done).content
    serve.delete("faults")
    serve.run(build(config), name="faults", route_prefix="/")
    assert client.videos.retrieve(done).status == "completed"
    assert client.videos.download_content(done).content == before
    assert {v.id for v in client.videos.list(limit=10)} == set(ids)
    serve.delete("faults")

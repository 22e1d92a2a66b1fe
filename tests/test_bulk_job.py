"""Bulk jobs on a local Ray cluster with the tiny model: outputs, manifest, resume, S3."""

import json
import os

import pyarrow.parquet as pq
import pytest
from helpers import SAME_VIDEO_DB, decoded, free_port, psnr

from kinoray.models.config import KinorayConfig, StageConfig
from kinoray.models.local import LocalPipeline
from kinoray.models.request import REQUEST_COLUMNS
from kinoray.models.video import encode_video, probe_video
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

CONFIG = KinorayConfig(
    encoder=StageConfig(num_cpus=1, batch_size=4),
    denoiser=StageConfig(num_cpus=1, batch_size=3, max_replicas=2),
    decoder=StageConfig(num_cpus=1, batch_size=3),
)
SHAPES = [
    {},
    {"height": 32, "width": 48, "num_frames": 5},
    {"height": 48, "width": 32, "num_frames": 13, "fps": 12},
]


def table_rows():
    rows = []
    for i in range(21):
        row = {"prompt": f"prompt {i}: a scene number {i}", **SHAPES[i % 3]}
        if i % 2 == 0:
            row["id"] = f"clip-{i:02d}"
            row["seed"] = 1000 + i
        if i % 5 == 0:
            row["negative_prompt"] = "blurry"
        rows.append(row)
    rows.insert(4, {"id": "no-prompt", "height": 64})
    rows.insert(9, {"id": "bad-height", "prompt": "bad", "height": 100})
    rows.insert(15, {"id": "bad-frames", "prompt": "bad", "num_frames": "lots"})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Set before Ray starts, so the stage and writer workers inherit them.
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint, ray_session):
    # The S3 endpoint's environment is set before Ray starts: stage and writer workers inherit it.
    return ray_session


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bulk")
    prompts = write_jsonl(tmp / "prompts.jsonl", table_rows())
    out = str(tmp / "out")
    summary = run_job(prompts, out, CONFIG, progress=False)
    return prompts, out, summary


def test_every_row_is_in_the_manifest_once(first_run):
    _, out, summary = first_run
    assert (summary.total, summary.ok, summary.failed, summary.skipped) == (24, 21, 3, 0)
    rows = manifest.read(out).to_pylist()
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert sorted(r["row"] for r in rows) == list(range(24))
    failed = {r["id"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"no-prompt", "bad-height", "bad-frames"}
    assert "prompt: field required" in failed["no-prompt"]
    assert "height: must be a multiple of 16" in failed["bad-height"]
    assert "num_frames" in failed["bad-frames"]
    # The compacted manifest is one Parquet part.
    assert len([p for p in os.listdir(os.path.join(out, "manifest")) if p.startswith("part-")]) == 1


def test_each_video_equals_the_in_process_result(first_run):
    _, out, _ = first_run
    ok = [r for r in manifest.read(out).to_pylist() if r["status"] == "ok"]
    assert len(ok) == 21
    local = LocalPipeline(KinorayConfig())
    for r in ok:
        data = open(r["output"], "rb").read()
        info = probe_video(data)
        assert (info["width"], info["height"], info["frames"], info["fps"]) == (
            r["width"],
            r["height"],
            r["num_frames"],
            r["fps"],
        )
        assert r["encode_s"] > 0 and r["denoise_s"] > 0 and r["decode_s"] > 0
    # Ray's batches and pools change nothing: decoded frames match the in-process run of each row.
    reqs = [local.request(**{k: r[k] for k in REQUEST_COLUMNS}) for r in ok]
    expected = local.run(reqs)["frames"]
    for r, ref in zip(ok, expected):
        got = decoded(open(r["output"], "rb").read())
        want = decoded(encode_video(ref, r["fps"]))
        assert got.shape == want.shape
        assert psnr(got, want) > SAME_VIDEO_DB, r["id"]


def test_resume_redoes_exactly_the_missing_rows(first_run, tmp_path):
    prompts, out, first = first_run
    rows = manifest.read(out).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    gone = {r["id"] for r in ok[:5]}
    for r in ok[:5]:
        os.remove(r["output"])
    mdir = os.path.join(out, "manifest")
    for p in os.listdir(mdir):
        os.remove(os.path.join(mdir, p))
    manifest.write_part(out, manifest.to_table([r for r in rows if r["id"] not in gone]), "0-edited")
    kept_mtimes = {r["output"]: os.stat(r["output"]).st_mtime_ns for r in ok[5:]}

    second = run_job(prompts, out, CONFIG, progress=False)
    # 16 ok rows skipped; the 5 deleted ones and the 3 bad rows are done again.
    assert (second.ok, second.failed, second.skipped) == (5, 3, 16)
    rows2 = manifest.read(out).to_pylist()
    assert len(rows2) == 24
    redone = {r["id"] for r in rows2 if r["run"] == second.run and r["status"] == "ok"}
    assert redone == gone
    assert all(os.path.exists(r["output"]) for r in rows2 if r["status"] == "ok")
    assert {o: os.stat(o).st_mtime_ns for o in kept_mtimes} == kept_mtimes


def test_s3_round_trip(ray_cluster, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("kinoray-test")
    rows = [
        {"id": "s3-a", "prompt": "from s3", "seed": 1},
        {"id": "s3-b", "prompt": "to s3", "num_frames": 1},
    ]
    with fs.open("kinoray-test/in/prompts.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job("s3://kinoray-test/in/prompts.jsonl", "s3://kinoray-test/out", CONFIG, progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    assert sorted(fs.ls("kinoray-test/out/videos")) == [
        "kinoray-test/out/videos/s3-a.mp4",
        "kinoray-test/out/videos/s3-b.png",
    ]
    assert probe_video(fs.cat("kinoray-test/out/videos/s3-a.mp4"))["frames"] == 9
    with fs.open(fs.ls("kinoray-test/out/manifest")[0], "rb") as f:
        table = pq.read_table(f)
    assert sorted(table.column("output").to_pylist()) == [
        "s3://kinoray-test/out/videos/s3-a.mp4",
        "s3://kinoray-test/out/videos/s3-b.png",
    ]

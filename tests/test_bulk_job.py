"""Bulk jobs on a local Ray cluster with the tiny model: every file shape, hostile rows, row
identity, resume after every kind of change, S3, --dry-run."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tables
from helpers import SAME_VIDEO_DB, decoded, psnr

from kinoray.cli import main
from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline
from kinoray.models.request import GenerationRequest
from kinoray.models.video import encode_video, probe_video
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

CONFIG = KinorayConfig.model_validate(
    {
        "encoder": {"batch_size": 4},
        "denoiser": {"batch_size": 3, "max_replicas": 2},
        "decoder": {"batch_size": 3},
        "batch": {"passthrough_columns": ["caption_id"]},
    }
)
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint, ray_session):
    return ray_session


def rows_by_position(out):
    return {(r["file"].rsplit("/", 1)[-1], r["row"]): r for r in manifest.read(out).to_pylist()}


def shape_rows(name, n=2):
    return [{"id": f"{name}-{i}", "prompt": f"{name} prompt {i}", "seed": i, **SMALL} for i in range(n)]


def test_every_file_shape_in_one_job(ray_cluster, tmp_path):
    src = tmp_path / "tables"
    src.mkdir()
    made = {
        "bom.jsonl": tables.jsonl(src / "bom.jsonl", shape_rows("bom"), bom=True, crlf=True, blank=True),
        "excel.csv": tables.pandas_csv(src / "excel.csv", shape_rows("csv"), bom=True),
        "data.tsv": tables.pandas_csv(src / "data.tsv", shape_rows("tsv"), sep="\t"),
        "sorted.parquet": tables.pandas_parquet_sorted(
            src / "sorted.parquet",
            [{**r, "seed": s} for r, s in zip(shape_rows("pq", 3), (2, 9, 5))],
            by="seed",
        ),
        "records.json": tables.pandas_json(src / "records.json", shape_rows("records"), "records"),
        "columns.json": tables.pandas_json(src / "columns.json", shape_rows("columns"), "columns"),
        "split.json": tables.pandas_json(src / "split.json", shape_rows("split"), "split"),
        "p.jsonl.gz": tables.compressed(src / "p.jsonl.gz", shape_rows("gz"), "gz"),
        "p.jsonl.zst": tables.compressed(src / "p.jsonl.zst", shape_rows("zst"), "zst"),
    }
    tables.spark_folder(src / "spark", shape_rows("spark", 4))
    out = str(tmp_path / "out")
    summary = run_job(str(src), out, CONFIG, progress=False)
    assert (summary.total, summary.ok, summary.failed) == (23, 23, 0)
    rows = manifest.read(out).to_pylist()
    assert len(rows) == 23
    by_file = {}
    for r in rows:
        by_file.setdefault(r["file"].rsplit("/", 1)[-1], []).append(r)
    for name in made:
        prefix = {"excel.csv": "csv", "data.tsv": "tsv", "sorted.parquet": "pq"}.get(name, name.split(".")[0])
        prefix = {"p": name.rsplit(".", 1)[-1]}.get(prefix, prefix)
        expected = [f"{prefix}-{i}" for i in range(3 if prefix == "pq" else 2)]
        assert sorted(r["id"] for r in by_file[name]) == expected, name
    spark = [r for name, rs in by_file.items() if name.startswith("part-") for r in rs]
    assert sorted(r["id"] for r in spark) == [f"spark-{i}" for i in range(4)]
    for r in rows:
        info = probe_video(open(r["output"], "rb").read())
        assert (info["width"], info["height"], info["frames"]) == (32, 32, 5)
    assert len(os.listdir(os.path.join(out, "videos"))) == 23


HOSTILE = [
    b'{"id": "good-1", "prompt": "good one", "height": 32, "width": 32, "num_frames": 5}',
    b'{"id": "surrogate", "prompt": "a cat \\ud83d then text"}',
    b'{"id": "inf", "prompt": "x", "height": 1e999}',
    b'{"id": "huge-seed", "prompt": "x", "seed": 99999999999999999999999}',
    b'{"id": "nested", "prompt": {"nested": true}}',
    b'{"id": "bool", "prompt": "x", "num_frames": true}',
    b'{"id": "text-fps", "prompt": "x", "fps": "fast"}',
    b"\xff\xfe not utf-8",
    b"[1, 2]",
    b'{"id": "good-2", "prompt": "good two", "height": 32, "width": 32, "num_frames": 5}',
]


def test_a_table_of_hostile_rows_loses_nothing(ray_cluster, tmp_path, capsys):
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(HOSTILE) + b"\n")
    out = tmp_path / "out"
    assert main(["batch", str(path), "-o", str(out), "--config", "examples/job.yaml"]) == 3
    rows = rows_by_position(str(out))
    assert sorted(rows) == [("hostile.jsonl", i) for i in range(len(HOSTILE))]
    status = {row: r["status"] for (_, row), r in rows.items()}
    assert [status[i] for i in range(10)] == ["ok"] + ["failed"] * 8 + ["ok"]
    fields = {
        1: "prompt",
        2: "height",
        3: "seed",
        4: "prompt",
        5: "num_frames",
        6: "fps",
    }
    for row, field in fields.items():
        assert rows[("hostile.jsonl", row)]["error"].startswith(f"{field}:"), rows[("hostile.jsonl", row)]
    assert "not valid UTF-8" in rows[("hostile.jsonl", 7)]["error"]
    assert "not a JSON object" in rows[("hostile.jsonl", 8)]["error"]
    assert sorted(os.listdir(out / "videos")) == ["good-1.mp4", "good-2.mp4"]
    assert "8 failed" in capsys.readouterr().out


def different(a, b):
    # Two seeds of one prompt on the tiny model differ by many levels somewhere.
    return np.abs(a.astype(int) - b.astype(int)).max() > 8


def test_row_identity(ray_cluster, tmp_path):
    rows = [
        {"prompt": "one prompt", "seed": 1, **SMALL},
        {"prompt": "one prompt", "seed": 2, **SMALL},
        {"id": "take-a", "prompt": "another prompt", **SMALL},
        {"id": "take-b", "prompt": "another prompt", **SMALL},
        {"id": "twice", "prompt": "first content", **SMALL},
        {"id": "twice", "prompt": "second content", **SMALL},
        {"prompt": "identical", **SMALL},
        {"prompt": "identical", **SMALL},
    ]
    path = tables.jsonl(tmp_path / "p.jsonl", rows)
    out = str(tmp_path / "out")
    summary = run_job(str(path), out, CONFIG, progress=False)
    assert (summary.total, summary.ok, summary.failed, summary.duplicate) == (8, 6, 1, 1)
    got = rows_by_position(out)
    r = [got[("p.jsonl", i)] for i in range(8)]
    videos = [decoded(open(x["output"], "rb").read()) if x["output"] else None for x in r]
    # Same prompt, two seeds: two videos. Two ids, no seeds: two takes.
    assert r[0]["id"] != r[1]["id"] and different(videos[0], videos[1])
    assert r[2]["seed"] != r[3]["seed"] and different(videos[2], videos[3])
    # The same explicit id with other content: the first is made, the second fails naming it.
    assert r[4]["status"] == "ok" and r[4]["prompt"] == "first content"
    assert (
        r[5]["status"] == "failed" and "row 4 of" in r[5]["error"] and r[5]["error_reason"] == "duplicate_id"
    )
    # Identical rows without ids: one generation, two manifest rows pointing at one output.
    assert r[6]["status"] == r[7]["status"] == "ok" and r[6]["output"] == r[7]["output"]
    assert r[7]["run"] == summary.run
    assert len(os.listdir(os.path.join(out, "videos"))) == 6


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    rows = [
        {
            "id": f"clip-{i:02d}",
            "prompt": f"prompt {i}: a scene",
            "seed": 100 + i,
            "caption_id": f"cap-{i}",
            **SMALL,
        }
        for i in range(12)
    ]
    rows[3]["negative_prompt"] = "blurry"
    rows.append({"prompt": "no id here", **SMALL})
    path = tables.jsonl(tmp / "prompts.jsonl", rows)
    out = str(tmp / "out")
    summary = run_job(str(path), out, CONFIG, progress=False)
    return path, rows, out, summary


def test_first_run_records_every_row_once_with_its_position(first_run):
    _, rows, out, summary = first_run
    assert (summary.total, summary.ok, summary.failed) == (13, 13, 0)
    table = manifest.read(out)
    assert table.num_rows == 13 and sorted(table["row"].to_pylist()) == list(range(13))
    assert table["caption_id"].to_pylist()[:3] == ["cap-0", "cap-1", "cap-2"]
    assert len([p for p in os.listdir(os.path.join(out, "manifest")) if p.startswith("part-")]) == 1
    # Ray's batches and pools change nothing: each video is the in-process result of its row.
    local = LocalPipeline(KinorayConfig())
    recorded = table.to_pylist()[:4]
    expected = local.run([GenerationRequest.from_row(r) for r in recorded])["frames"]
    for r, ref in zip(recorded, expected):
        assert r["encode_s"] > 0 and r["denoise_s"] > 0 and r["decode_s"] > 0
        assert (
            psnr(decoded(open(r["output"], "rb").read()), decoded(encode_video(ref, r["fps"])))
            > SAME_VIDEO_DB
        )


def rerun(first_run, tmp_path, rows, config=CONFIG, delete=()):
    """A rerun on a copy of the first run's output, with `rows` as the table and the videos of
    `delete` (ids) removed first: (summary, manifest rows by position, videos made again)."""
    path, _, out, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for rid in delete:
        os.remove(copy / "videos" / f"{rid}.mp4")
    table = tables.jsonl(tmp_path / path.name, rows)
    mtimes = {p: p.stat().st_mtime_ns for p in (copy / "videos").iterdir()}
    summary = run_job(str(table), str(copy), config, progress=False)
    remade = {p.name for p in (copy / "videos").iterdir() if mtimes.get(p) != p.stat().st_mtime_ns}
    return summary, rows_by_position(str(copy)), remade


def test_resume_after_deleting_videos(first_run, tmp_path):
    gone = [f"clip-{i:02d}" for i in (1, 4, 5, 7, 9)]
    summary, got, remade = rerun(first_run, tmp_path, first_run[1], delete=gone)
    assert (summary.ok, summary.skipped, summary.failed) == (5, 8, 0)
    assert remade == {f"{rid}.mp4" for rid in gone}
    assert {got[("prompts.jsonl", i)]["run"] for i in (1, 4, 5, 7, 9)} == {summary.run}
    assert {got[("prompts.jsonl", i)]["run"] for i in (0, 2, 3)} == {first_run[3].run}
    assert len(got) == 13 and all(os.path.exists(r["output"]) for r in got.values())


def test_resume_after_editing_one_prompt(first_run, tmp_path):
    rows = [dict(r) for r in first_run[1]]
    rows[6]["prompt"] = "an edited prompt"
    summary, got, remade = rerun(first_run, tmp_path, rows)
    assert (summary.ok, summary.skipped) == (1, 12)
    assert remade == {"clip-06.mp4"}
    assert got[("prompts.jsonl", 6)]["prompt"] == "an edited prompt"


def test_resume_records_a_row_that_became_invalid(first_run, tmp_path):
    rows = [dict(r) for r in first_run[1]]
    rows[2]["height"] = 100
    summary, got, remade = rerun(first_run, tmp_path, rows)
    assert (summary.ok, summary.skipped, summary.failed) == (0, 12, 1)
    row = got[("prompts.jsonl", 2)]
    assert row["status"] == "failed" and "height: must be a multiple of 16" in row["error"]
    assert not remade


def test_resume_with_another_model_regenerates_every_row(first_run, tmp_path):
    config = CONFIG.with_model(weights="tiny-wan22")
    summary, got, remade = rerun(first_run, tmp_path, [dict(r) for r in first_run[1]], config)
    assert (summary.ok, summary.skipped) == (13, 0)
    assert len(remade) == 13


def test_dry_run_plans_without_generating(first_run, tmp_path, capsys):
    path, rows, out, _ = first_run
    shutil.copytree(out, tmp_path / "out")
    os.remove(tmp_path / "out" / "videos" / "clip-00.mp4")
    extra = [*rows, {"prompt": "bad", "height": 100}, {"prompt": "new one", **SMALL, "height": 64}]
    table = tables.jsonl(tmp_path / path.name, extra)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(CONFIG.model_dump(mode="json", exclude={"model"})))
    before = sorted(os.listdir(tmp_path / "out" / "manifest"))
    code = main(["batch", str(table), "-o", str(tmp_path / "out"), "--dry-run", "--config", str(config)])
    printed = capsys.readouterr().out
    assert code == 3  # a row would fail
    assert "dry run: 15 rows" in printed
    assert "to generate: 2" in printed and "to skip (done): 12" in printed
    assert "to fail: 1 (invalid_request 1)" in printed
    assert "32x32, 5 frames, 2 steps" in printed and "32x64, 5 frames, 2 steps" in printed
    assert sorted(os.listdir(tmp_path / "out" / "manifest")) == before  # nothing written
    assert not os.path.exists(tmp_path / "out" / "videos" / "clip-00.mp4")


def test_s3_in_and_out(ray_cluster, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("kinoray-test")
    with fs.open("kinoray-test/in/part-0.jsonl", "w") as f:
        f.write(json.dumps({"id": "s3-a", "prompt": "from s3", "seed": 1}) + "\n")
    with fs.open("kinoray-test/in/part-1.jsonl", "w") as f:
        f.write(json.dumps({"id": "s3-b", "prompt": "to s3", "num_frames": 1}) + "\n")
    summary = run_job("s3://kinoray-test/in/", "s3://kinoray-test/out", CONFIG, progress=False)
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
    assert sorted(table.column("file").to_pylist()) == [
        "s3://kinoray-test/in/part-0.jsonl",
        "s3://kinoray-test/in/part-1.jsonl",
    ]

"""LoRA adapters end to end: a bulk table with a `lora` column (Parquet list<struct> as pandas
writes it, CSV text), and the Videos API with two denoiser replicas that hold one adapter each,
where Serve's model multiplexing sends every request to the replica holding its adapter."""

import json
import time

import pandas as pd
import pytest
import requests
from helpers import SAME_VIDEO_DB, decoded, finished, free_port, openai_app, psnr

from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

RAY_METRICS_PORT = free_port()
RAY_INIT = {"_metrics_export_port": RAY_METRICS_PORT}
RAY_ENV = {"RAY_metrics_report_interval_ms": "1000"}
CATALOG = {"pastel": "tiny-lora-1", "neon": "tiny-lora-2"}
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}


def test_a_bulk_table_with_a_lora_column(ray_session, tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    # Parquet as pandas writes a column of lists of structs.
    pd.DataFrame(
        [
            {"id": "plain", "prompt": "a fox", "seed": 1, "lora": None, **SMALL},
            {
                "id": "pastel",
                "prompt": "a fox",
                "seed": 1,
                "lora": [{"name": "pastel", "scale": 1.0}],
                **SMALL,
            },
            {"id": "half", "prompt": "a fox", "seed": 1, "lora": [{"name": "pastel", "scale": 0.5}], **SMALL},
            {
                "id": "unknown",
                "prompt": "a fox",
                "seed": 1,
                "lora": [{"name": "sepia", "scale": 1.0}],
                **SMALL,
            },
        ]
    ).to_parquet(tables / "a.parquet")
    # CSV cells: the short form and JSON text.
    pd.DataFrame(
        [
            {"id": "neon", "prompt": "a fox", "seed": 1, "lora": "neon", **SMALL},
            {
                "id": "both",
                "prompt": "a fox",
                "seed": 1,
                "lora": '[{"name": "neon"}, {"name": "pastel"}]',
                **SMALL,
            },
            {"id": "path", "prompt": "a fox", "seed": 1, "lora": "/etc/passwd", **SMALL},
            {"id": "none", "prompt": "a cat", "seed": 2, "lora": "", **SMALL},
        ]
    ).to_csv(tables / "b.csv", index=False)
    config = KinorayConfig.model_validate({"loras": CATALOG})
    out = str(tmp_path / "out")
    summary = run_job(str(tables), out, config, progress=False)
    assert (summary.ok, summary.failed) == (6, 2)
    # Rows are counted by shape and adapters (as --dry-run prints them): each is one bucket of
    # denoiser batches.
    shape = "32x32, 5 frames, 2 steps"
    assert summary.shapes == {
        shape: 2,
        f"{shape}, lora pastel:1": 1,
        f"{shape}, lora pastel:0.5": 1,
        f"{shape}, lora neon:1": 1,
        f"{shape}, lora neon:1 + pastel:1": 1,
    }
    recorded = {r["id"]: r for r in manifest.read(out).to_pylist()}
    for rid in ("unknown", "path"):
        assert recorded[rid]["status"] == "failed" and recorded[rid]["error"].startswith("lora: ")
    assert "unknown adapter 'sepia'" in recorded["unknown"]["error"]
    assert "looks like a path" in recorded["path"]["error"]
    # A failed row keeps what its table said.
    assert json.loads(recorded["unknown"]["lora"]) == [{"name": "sepia", "scale": 1.0}]
    assert recorded["path"]["lora"] == "/etc/passwd"
    # The manifest records each row's adapters with their scales.
    assert json.loads(recorded["half"]["lora"]) == [{"name": "pastel", "scale": 0.5}]
    assert json.loads(recorded["both"]["lora"]) == [
        {"name": "neon", "scale": 1.0},
        {"name": "pastel", "scale": 1.0},
    ]
    assert recorded["plain"]["lora"] is None and recorded["none"]["lora"] is None
    # Each video is the in-process stages' video for its adapters.
    local = LocalPipeline(config)
    for rid in ("plain", "pastel", "half", "neon", "both"):
        want = local.run(
            [local.request(**{k: recorded[rid][k] for k in ("id", "prompt", "seed", "lora")}, **SMALL)]
        )
        video = decoded((tmp_path / "out" / "videos" / f"{rid}.mp4").read_bytes())
        assert psnr(video, want["frames"][0]) > SAME_VIDEO_DB, rid
    videos = {
        rid: (tmp_path / "out" / "videos" / f"{rid}.mp4").read_bytes() for rid in ("plain", "pastel", "half")
    }
    assert len(set(videos.values())) == 3
    # A rerun skips every row that succeeded: the adapters are part of each row's identity.
    again = run_job(str(tables), out, config, progress=False)
    assert again.skipped == 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def client(serve_base, store):
    from ray import serve

    config = KinorayConfig.model_validate(
        {
            "loras": CATALOG,
            "defaults": SMALL,
            "serve": {"storage": str(store)},
            "denoiser": {"min_replicas": 2, "max_replicas": 2, "max_loras": 1, "num_cpus": 0.5},
        }
    )
    yield openai_app(serve_base, config, "lora")
    serve.delete("lora")


def loads():
    """kinoray_lora_loads_total of the denoise stage by adapter, summed over Ray's workers, from
    Ray's metrics endpoint."""
    text = requests.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=10).text
    out = dict.fromkeys(CATALOG, 0.0)
    for line in text.splitlines():
        if line.startswith("ray_kinoray_lora_loads_total{") and 'stage="denoise"' in line:
            name = line.split('lora="', 1)[1].split('"', 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def settled():
    """The counters once every worker has reported (they report every second here)."""
    last, value = None, loads()
    while value != last:
        time.sleep(1.5)
        last, value = value, loads()
    return value


def test_requests_go_to_the_replica_that_holds_their_adapter(client, store):
    before = settled()  # earlier tests' loads
    replicas = {}
    for k, name in enumerate(["pastel", "neon"] * 3):
        video = client.videos.create(
            prompt="a fox", extra_body={"seed": k, "lora": [{"name": name, "scale": 0.8}]}
        )
        video = finished(client, video)
        assert video.status == "completed", video.error
        assert video.model_extra["lora"] == [{"name": name, "scale": 0.8}]
        record = json.loads((store / "jobs" / f"{video.id}.json").read_text())
        replicas.setdefault(name, []).append(record["denoised_by"])
    # Each adapter stayed on one replica, and they are two replicas: with room for one adapter
    # each, any other routing would have evicted one and loaded it again.
    assert len(set(replicas["pastel"])) == 1 and len(set(replicas["neon"])) == 1, replicas
    assert replicas["pastel"][0] != replicas["neon"][0]
    # One load per adapter, on its replica; every later request found its adapter loaded.
    after = settled()
    assert {name: after[name] - before[name] for name in CATALOG} == {"pastel": 1, "neon": 1}


def test_an_unknown_or_path_like_adapter_is_a_400_naming_lora(client):
    base = str(client.base_url).rstrip("/")
    for value, words in [
        ([{"name": "sepia"}], "unknown adapter 'sepia'"),
        ([{"name": "../../etc/passwd"}], "looks like a path"),
        ("hf://someone/lora", "looks like a path"),
        ([{"name": "pastel", "scale": "loud"}], "scale"),
        ("pastel:nan", "not a number"),
        ([{"name": "pastel", "scale": 1e300}], "between -10 and 10"),
        ([{"name": f"n{i}"} for i in range(100_000)], "more than 64 adapters"),
    ]:
        res = requests.post(f"{base}/videos", json={"prompt": "a fox", "lora": value})
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error["param"] == "lora" and words in error["message"], error
    # Refused before any job exists: nothing to list.
    assert [v for v in client.videos.list() if v.status == "failed"] == []
    # Repeated form fields add up, as repeated --lora flags do (here past this deployment's
    # one adapter per request), rather than the last one winning.
    res = requests.post(
        f"{base}/videos",
        files=[("prompt", (None, "a fox")), ("lora", (None, "pastel")), ("lora", (None, "neon:0.5"))],
    )
    assert res.status_code == 400 and "2 adapters" in res.json()["error"]["message"], res.text
    # The same list in a multipart form, as the openai client sends `extra_body` with a file.
    res = requests.post(
        f"{base}/videos",
        files={"prompt": (None, "a fox"), "lora[][name]": (None, "pastel"), "lora[][scale]": (None, "0.5")},
    )
    assert res.status_code == 200, res.text
    assert res.json()["lora"] == [{"name": "pastel", "scale": 0.5}]

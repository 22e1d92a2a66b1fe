"""Bulk jobs whose VAE decode runs out of memory: retried with leaner plans, or the latents saved
and decoded by the next run without denoising again. Faults come from the documented
`decoder.testing_oom` setting; counters are read from Ray's metrics endpoint."""

import json
import os
import time

import pytest
import requests
from helpers import free_port

from kinoray.models.config import KinorayConfig
from kinoray.models.latents import load_latents
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

RAY_METRICS_PORT = free_port()
RAY_INIT = {"_metrics_export_port": RAY_METRICS_PORT}
RAY_ENV = {"RAY_metrics_report_interval_ms": "1000"}
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}


def config(testing_oom=None):
    return KinorayConfig.model_validate(
        {
            "encoder": {"batch_size": 4},
            "denoiser": {"batch_size": 4},
            "decoder": {"batch_size": 2, "max_replicas": 1, "testing_oom": testing_oom},
        }
    )


def table(path, n, prefix):
    rows = [{"id": f"{prefix}{i}", "prompt": f"clip {i}", "seed": i, **SMALL} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def counter(name, **labels):
    """The sum of a kinoray counter over Ray's workers, as Ray's metrics endpoint exports it."""
    text = requests.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled(name, **labels):
    """The counter once workers have reported (they report every second here)."""
    last, deadline = -1.0, time.time() + 20
    while time.time() < deadline:
        value = counter(name, **labels)
        if value == last and value > 0:
            return value
        last = value
        time.sleep(2)
    return last


def test_every_third_decode_fails_once_and_no_row_is_lost(ray_session, tmp_path):
    out = tmp_path / "out"
    summary = run_job(str(table(tmp_path / "p.jsonl", 12, "r")), str(out), config("every=3"), progress=False)
    assert (summary.ok, summary.failed, summary.denoised) == (12, 0, 0)
    rows = manifest.read(str(out)).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    retries = settled("kinoray_decode_oom_retries_total")  # then every counter has been reported
    decodes = sum(counter("kinoray_decode_plans_total", plan=p) for p in ("whole", "split", "tiled"))
    # One decoder: every third of its VAE calls failed and was retried with the next plan.
    assert retries >= 1
    assert retries == (decodes + retries) // 3
    assert (
        counter("kinoray_decode_plans_total", plan="split")
        + counter("kinoray_decode_plans_total", plan="tiled")
        >= 1
    )


def test_rows_that_never_decode_keep_their_latents_and_the_rerun_skips_the_denoiser(ray_session, tmp_path):
    out = tmp_path / "out"
    prompts = str(table(tmp_path / "p.jsonl", 6, "s"))
    first = run_job(prompts, str(out), config("ids=s1,s4"), progress=False)
    assert (first.ok, first.denoised, first.failed) == (4, 2, 0)
    rows = {r["id"]: r for r in manifest.read(str(out)).to_pylist()}
    for i in ("s1", "s4"):
        assert rows[i]["status"] == "denoised"
        assert rows[i]["error_reason"] == "out_of_memory" and "latents" in rows[i]["error"]
        saved = out / "latents" / f"{i}.safetensors"
        latents, metadata = load_latents(saved.read_bytes())
        assert json.loads(metadata["request"])["id"] == i and latents.ndim == 4
        assert metadata["request_digest"] == rows[i]["request_digest"]
    assert "latents saved" in first.render()

    steps_before = settled("kinoray_denoise_steps_total")
    second = run_job(prompts, str(out), config(), progress=False)
    assert (second.ok, second.resumed, second.skipped, second.denoised) == (2, 2, 4, 0)
    assert "decoded from saved latents: 2" in second.render()
    rows = {r["id"]: r for r in manifest.read(str(out)).to_pylist()}
    for i in ("s1", "s4"):
        assert rows[i]["status"] == "ok" and rows[i]["error"] in ("", None)
        assert rows[i]["denoise_s"] is None and rows[i]["decode_s"] > 0
        assert os.path.getsize(rows[i]["output"]) > 0
    assert not list((out / "latents").glob("*.safetensors"))
    # The denoiser did no step in the second run.
    time.sleep(3)
    assert counter("kinoray_denoise_steps_total") == steps_before
    assert counter("kinoray_latents_resumed_total") == 2
    assert counter("kinoray_latents_saved_total", frontend="bulk") == 2


def test_a_dry_run_counts_saved_latents_and_a_changed_row_drops_them(ray_session, tmp_path):
    out = tmp_path / "out"
    path = table(tmp_path / "p.jsonl", 3, "t")
    first = run_job(str(path), str(out), config("ids=t1"), progress=False)
    assert (first.ok, first.denoised) == (2, 1)
    plan = run_job(str(path), str(out), config(), progress=False, dry_run=True)
    assert "to generate: 1 (1 decoded from saved latents)" in plan.render()
    assert (out / "latents" / "t1.safetensors").exists()  # a dry run deletes nothing
    # t1's prompt changes: its saved latents can never be used, and go.
    path.write_text(path.read_text().replace('"clip 1"', '"clip 1, edited"'))
    second = run_job(str(path), str(out), config(), progress=False)
    assert (second.ok, second.resumed, second.skipped) == (1, 0, 2)
    assert not (out / "latents" / "t1.safetensors").exists()
    row = next(r for r in manifest.read(str(out)).to_pylist() if r["id"] == "t1")
    assert row["status"] == "ok" and row["prompt"] == "clip 1, edited" and row["denoise_s"] > 0


def test_online_decode_retries_or_keeps_the_latents_until_the_video_is_deleted(serve_base, tmp_path):
    import openai
    from ray import serve

    from kinoray.deployments.app import build

    store = tmp_path / "store"
    cfg = KinorayConfig.model_validate(
        {
            "serve": {"storage": str(store)},
            "decoder": {
                "max_replicas": 1,
                "batch_wait_timeout_s": 0.01,
                "testing_oom": "every=2;prompt=never fits",
            },
        }
    )
    serve.run(build(cfg), name="faults", route_prefix="/")
    client = openai.OpenAI(base_url=f"{serve_base}/v1", api_key="unused", max_retries=0)
    retries_before = counter("kinoray_decode_oom_retries_total")

    def finished(prompt):
        video = client.videos.create(prompt=prompt, size="64x64", seconds="1")
        deadline = time.time() + 120
        while video.status not in ("completed", "failed") and time.time() < deadline:
            time.sleep(0.1)
            video = client.videos.retrieve(video.id)
        return video

    # Decode calls 1 (ok), 2 (fails, retried as call 3), then 4, 5, 6 for the prompt that never fits.
    assert finished("a fox").status == "completed"
    retried = finished("a cat")
    assert retried.status == "completed"
    assert len(client.videos.download_content(retried.id).read()) > 0
    kept = finished("a whale that never fits")
    assert kept.status == "failed"
    assert kept.error.code == "out_of_memory"
    assert "latents" in kept.error.message and "deleted" in kept.error.message
    saved = store / "latents" / f"{kept.id}.safetensors"
    assert saved.stat().st_size > 0
    assert client.videos.delete(kept.id).deleted
    assert not saved.exists()
    deadline = time.time() + 20
    while counter("kinoray_decode_oom_retries_total") < retries_before + 4 and time.time() < deadline:
        time.sleep(1)
    assert counter("kinoray_decode_oom_retries_total") == retries_before + 4
    serve.delete("faults")

"""Every family's tiny preset runs end to end through the bulk job and the online app."""

import json
import socket
import time

import pytest

from models.config import KinorayConfig
from models.video import probe_video
from pipelines.job import run_job

pytestmark = pytest.mark.integration

PRESETS = ["tiny-wan", "tiny-wan22", "tiny-cogvideox", "tiny-ltx"]


@pytest.fixture(scope="module")
def port():
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("preset", PRESETS)
def test_bulk_and_online(port, preset, tmp_path):
    import openai
    from ray import serve

    from deployments.app import build

    config = KinorayConfig.model_validate(
        {"model": {"weights": preset}, "serve": {"storage": str(tmp_path / "store")}}
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "a fox", "seed": 1})
        + "\n"
        + json.dumps({"id": "b", "prompt": "a boat", "height": 32, "width": 64, "num_frames": 17})
        + "\n"
    )
    summary = run_job(str(prompts), str(tmp_path / "out"), config, progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    assert probe_video((tmp_path / "out" / "videos" / "b.mp4").read_bytes())["frames"] == 17

    serve.run(build(config), name=preset, route_prefix=f"/{preset}")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{preset}/v1", api_key="x", max_retries=0)
    video = client.videos.create(prompt="a lighthouse", model=preset, extra_body={"seed": 3})
    deadline = time.time() + 120
    while video.status not in ("completed", "failed") and time.time() < deadline:
        time.sleep(0.1)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video.error
    info = probe_video(client.videos.download_content(video.id).content)
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 9)
    serve.delete(preset)

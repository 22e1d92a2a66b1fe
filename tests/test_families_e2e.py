"""Every family's tiny preset runs end to end through the bulk job and the online app."""

import base64
import io
import json
import time

import pytest
import requests
from PIL import Image

from kinoray.models import tiny
from kinoray.models.config import KinorayConfig
from kinoray.models.spec import ModelSpec
from kinoray.models.video import probe_video
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

# The Wan family runs end to end in most other integration modules: tiny-wan is their model
# (test_bulk_job, test_serve_app, test_faults, ...), shapes-wan runs online in test_first_hour
# (the example Serve config), tiny-wan22's guidance_scale_2 reaches every front end in
# test_guidance_scale_2, and Wan 2.2 TI2V's layout runs end to end in test_image_to_video_e2e.
PRESETS = [
    p
    for p in tiny.preset_names(tested_only=True, image=False)
    if p not in ("shapes-wan", "tiny-wan", "tiny-wan22")
]


@pytest.mark.parametrize("preset", PRESETS)
def test_bulk_and_online(serve_base, preset, tmp_path):
    import openai
    from ray import serve

    from kinoray.deployments.app import build

    config = KinorayConfig.model_validate(
        {"model": {"weights": preset}, "serve": {"storage": str(tmp_path / "store")}}
    )
    image = ModelSpec(weights=preset).info.is_image_model
    frames = 1 if image else 17
    rows = [
        {"id": "a", "prompt": "a fox", "seed": 1},
        {"id": "b", "prompt": "a boat", "height": 32, "width": 64, "num_frames": frames},
    ]
    # Family-specific sampling parameters travel as table columns too (Wan 2.2's guidance_scale_2).
    optional = sorted(config.request_builder().limits.optional_params)
    rows[1].update({name: 2.0 for name in optional})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job(str(prompts), str(tmp_path / "out"), config, progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    recorded = {r["id"]: r for r in manifest.read(str(tmp_path / "out")).to_pylist()}
    assert all(recorded["b"][name] == 2.0 for name in optional)
    if image:
        with Image.open(tmp_path / "out" / "videos" / "b.png") as im:
            assert im.size == (64, 32)
    else:
        assert probe_video((tmp_path / "out" / "videos" / "b.mp4").read_bytes())["frames"] == 17

    serve.run(build(config), name=preset, route_prefix=f"/{preset}")
    client = openai.OpenAI(base_url=f"{serve_base}/{preset}/v1", api_key="x", max_retries=0)
    if image:  # the Videos API always returns a video: an image model cannot make one
        with pytest.raises(openai.BadRequestError) as info:
            client.videos.create(prompt="a lighthouse", model=preset)
        assert info.value.body["param"] == "model"
    else:
        video = client.videos.create(prompt="a lighthouse", model=preset, extra_body={"seed": 3})
        deadline = time.time() + 120
        while video.status not in ("completed", "failed") and time.time() < deadline:
            time.sleep(0.1)
            video = client.videos.retrieve(video.id)
        assert video.status == "completed", video.error
        info = probe_video(client.videos.download_content(video.id).content)
        assert (info["width"], info["height"], info["frames"]) == (64, 64, 9)

    # OpenAI's Images API, on every family (a one-frame generation).
    res = client.images.generate(
        prompt="a red apple", model=preset, n=2, size="64x32", response_format="b64_json"
    )
    pngs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert [im.size for im in pngs] == [(64, 32), (64, 32)]
    assert pngs[0].tobytes() != pngs[1].tobytes()  # consecutive seeds, two different images
    res = client.images.generate(prompt="a red apple", model=preset, size="64x32", response_format="url")
    fetched = requests.get(res.data[0].url, timeout=30)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (64, 32)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", model=preset, size="100x100")
    serve.delete(preset)

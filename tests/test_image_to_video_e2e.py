"""Image-to-video end to end: a bulk table whose `image` column names local, S3, http and inline
(Parquet bytes) images, and the Videos API's `input_reference` through the official client."""

import base64
import hashlib
import http.server
import io
import json
import struct
import threading
import zlib

import numpy as np
import pandas as pd
import pytest
import requests
from helpers import SAME_VIDEO_DB, decoded, finished, free_port, openai_app, psnr
from PIL import Image

from kinoray.models.config import KinorayConfig
from kinoray.models.local import LocalPipeline
from kinoray.models.scenes import sample_scene
from kinoray.models.spec import ModelSpec
from kinoray.models.video import encode_video
from kinoray.pipelines import manifest
from kinoray.pipelines.job import run_job

pytestmark = pytest.mark.integration

MODEL = "tiny-wan-i2v"
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
# Online: the trained model run as Wan 2.2 TI2V, whose first frame is the reference image.
ONLINE_MODEL = "shapes-wan-ti2v"
ONLINE = {"num_inference_steps": 4}


def png(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` on 127.0.0.1 and counts the requests it was sent."""

    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self):
        Files.hits.append(self.path)
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_files():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def cluster(s3_endpoint, ray_session):
    return ray_session


def test_a_bulk_table_of_local_s3_http_and_inline_images(cluster, http_files, tmp_path):
    import fsspec

    images = {k: png(k) for k in range(5)}
    (tmp_path / "tables" / "img").mkdir(parents=True)
    (tmp_path / "tables" / "img" / "0.png").write_bytes(images[0])
    (tmp_path / "elsewhere.png").write_bytes(images[1])
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    s3.mkdir("refs")
    s3.pipe("refs/2.png", images[2])
    Files.files["/3.png"] = images[3]
    rows = [
        {"id": "relative", "prompt": "a fox", "seed": 1, "image": "img/0.png"},
        {"id": "absolute", "prompt": "a fox", "seed": 1, "image": str(tmp_path / "elsewhere.png")},
        {"id": "s3", "prompt": "a boat", "seed": 2, "image": "s3://refs/2.png"},
        {"id": "http", "prompt": "a kite", "seed": 3, "image": f"{http_files}/3.png"},
        {"id": "missing", "prompt": "a fox", "seed": 1, "image": "img/nope.png"},
        # No ids: the same prompt and seed with two images are two rows, two videos.
        {"prompt": "twins", "seed": 5, "image": "img/0.png"},
        {"prompt": "twins", "seed": 5, "image": str(tmp_path / "elsewhere.png")},
    ]
    (tmp_path / "tables" / "rows.jsonl").write_text("".join(json.dumps({**r, **SMALL}) + "\n" for r in rows))
    # A Parquet table (as pandas writes it) holding the image files' bytes.
    pd.DataFrame([{"id": "inline", "prompt": "a cat", "seed": 4, "image": images[4], **SMALL}]).to_parquet(
        tmp_path / "tables" / "bytes.parquet"
    )
    config = KinorayConfig.model_validate(
        {"model": {"weights": MODEL}, "images": {"allow_private_networks": True}}
    )
    out = str(tmp_path / "out")
    summary = run_job(str(tmp_path / "tables"), out, config, progress=False)
    assert (summary.ok, summary.failed) == (7, 1)
    recorded = {r["id"]: r for r in manifest.read(out).to_pylist()}
    assert recorded["missing"]["status"] == "failed"
    assert recorded["missing"]["error"].startswith("image: ") and "nope.png" in recorded["missing"]["error"]
    expected = {"relative": 0, "absolute": 1, "s3": 2, "http": 3, "inline": 4}
    for rid, k in expected.items():
        assert recorded[rid]["status"] == "ok", recorded[rid]["error"]
        assert recorded[rid]["image_sha256"] == sha(images[k])
    # A relative path is recorded as resolved against the table's folder; inline bytes as a label.
    assert recorded["relative"]["image"] == str(tmp_path / "tables" / "img" / "0.png")
    assert recorded["inline"]["image"] == f"data:;base64,... ({len(images[4])} bytes)"
    twins = [r for r in recorded.values() if r["prompt"] == "twins"]
    assert len({r["id"] for r in twins}) == 2 and {r["image_sha256"] for r in twins} == {
        sha(images[0]),
        sha(images[1]),
    }
    videos = {
        rid: (tmp_path / "out" / "videos" / f"{rid}.mp4").read_bytes() for rid in ("relative", "absolute")
    }
    assert videos["relative"] != videos["absolute"]  # same prompt and seed, another image


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def client(serve_base, store):
    config = KinorayConfig.model_validate(
        {"model": {"weights": ONLINE_MODEL}, "serve": {"storage": str(store)}, "defaults": ONLINE}
    )
    return openai_app(serve_base, config, "i2v")


def test_the_official_client_uploads_a_reference_image(client, store, tmp_path):
    scene = sample_scene(np.random.default_rng(3))
    path = tmp_path / "frame.png"
    Image.fromarray(scene.render()[0]).save(path)
    prompt = scene.caption()
    with open(path, "rb") as f:
        video = client.videos.create(prompt=prompt, input_reference=f, extra_body={"seed": 3})
    video = finished(client, video)
    assert video.status == "completed", video.error
    assert video.model_extra["input_reference_sha256"] == sha(path.read_bytes())
    data = client.videos.download_content(video.id).content
    # The first frame is the image, as well as the model's VAE (and MP4) reproduce it: measured
    # 23.0 dB; another scene's first frame is far from it.
    first = np.asarray(Image.open(path).convert("RGB"))
    elsewhere = sample_scene(np.random.default_rng(4)).render()[0]
    assert psnr(decoded(data)[0], first) > 20
    assert psnr(decoded(data)[0], elsewhere) < psnr(decoded(data)[0], first) - 3
    # The video is the one the stages make in-process for this prompt, seed and image (up to
    # float rounding of another thread count), and not the one they make for another image.
    local = LocalPipeline(KinorayConfig(model=ModelSpec(weights=ONLINE_MODEL), defaults=ONLINE))
    same = rendered(local, prompt=prompt, seed=3, image=str(path))
    other = rendered(local, prompt=prompt, seed=3, image=_saved(tmp_path, png(8, (64, 64))))
    assert psnr(decoded(data), same) > SAME_VIDEO_DB > psnr(decoded(data), other)

    # The same image as a JSON data URL makes the same video (MP4 headers carry a time).
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    again = requests.post(
        f"{client.base_url}videos",
        json={"prompt": prompt, "seed": 3, "input_reference": {"image_url": url}},
    )
    assert again.status_code == 200, again.text
    twin = finished(client, client.videos.retrieve(again.json()["id"]))
    assert twin.status == "completed"
    assert psnr(decoded(client.videos.download_content(twin.id).content), decoded(data)) > SAME_VIDEO_DB

    # Deleting the job removes its copy of the image.
    references = store / "references"
    assert (references / video.id).read_bytes() == path.read_bytes()
    client.videos.delete(video.id)
    assert not (references / video.id).exists()


def rendered(local, **fields):
    """The decoded MP4 of what `local` (a LocalPipeline) makes for `fields`."""
    frames = local.run([local.request(**fields)])["frames"][0]
    return decoded(encode_video(frames, local.builder.defaults["fps"]))


def _saved(tmp_path, data):
    path = tmp_path / f"{sha(data)[:8]}.png"
    path.write_bytes(data)
    return str(path)


def bomb():
    """A 160-byte PNG whose header claims 50,000 x 50,000 pixels."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("corrupt.png", b"\x89PNG\r\n\x1a\nnot really", "damaged"),
        ("bomb.png", bomb(), "pixels"),
        ("big.png", b"\x89PNG" + b"\x00" * (21 * 1024 * 1024), "bytes"),
    ],
)
def test_a_bad_image_is_a_400_naming_input_reference_and_the_server_stays_up(client, name, data, words):
    res = requests.post(
        f"{client.base_url}videos",
        data={"prompt": "a fox"},
        files={"input_reference": (name, data, "image/png")},
    )
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["param"] == "input_reference" and words in error["message"]
    assert requests.get(f"{client.base_url}models").status_code == 200


def test_urls_the_server_must_not_fetch_are_refused(client, http_files):
    Files.files["/inside.png"] = png(9)
    Files.hits.clear()
    for value, words in [
        ({"image_url": f"{http_files}/inside.png"}, "private"),  # loopback: refused by default
        ({"image_url": "file:///etc/passwd"}, "data: URL or an http(s) URL"),
        ({"file_id": "file-abc"}, "file_id"),
    ]:
        res = requests.post(f"{client.base_url}videos", json={"prompt": "a fox", "input_reference": value})
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error["param"] == "input_reference" and words in error["message"], error
    assert Files.hits == []  # nothing was requested from the loopback server
    # The request's `image` field is not an API field: a client cannot name a server path.
    res = requests.post(f"{client.base_url}videos", json={"prompt": "a fox", "image": "/etc/passwd"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "image"


def test_a_url_on_the_own_network_is_fetched_when_the_config_allows_it(http_files):
    """What the ingress does with `input_reference` under `images.allow_private_networks`."""
    import asyncio

    from kinoray.deployments.api import APIError, read_input_reference
    from kinoray.models.images import ImagePolicy

    Files.files["/own.png"] = png(10)
    allowed = ImagePolicy(allow_private_networks=True)
    value = {"image_url": f"{http_files}/own.png"}
    assert asyncio.run(read_input_reference(value, allowed, 32, 32)) == png(10)
    Files.hits.clear()
    with pytest.raises(APIError) as info:  # the default policy: refused before connecting
        asyncio.run(read_input_reference(value, ImagePolicy(), 32, 32))
    assert (info.value.status, info.value.param) == (400, "input_reference") and Files.hits == []

"""Test helpers: comparing videos that went through float math in different batch compositions,
and free loopback ports."""

import io
import socket
import time

import av
import numpy as np


def decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# Float32 rounding differs between batch sizes, and a random tiny model amplifies it over the
# denoising steps by a few levels of 255 (>= 35 dB); another seed or prompt gives ~10-15 dB.
SAME_VIDEO_DB = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def same_video(data: bytes, local, **fields) -> bool:
    """Whether MP4 `data` is the video `local` (a LocalPipeline) makes for `fields`."""
    from kinoray.models.video import encode_video

    ref = local.run([local.request(**fields)])["frames"][0]
    got, want = decoded(data), decoded(encode_video(ref, fields.get("fps", 8)))
    return got.shape == want.shape and psnr(got, want) > SAME_VIDEO_DB


def finished(client, video, timeout=120.0):
    """`video` (an openai Video) once it is completed or failed, polled through `client`."""
    deadline = time.time() + timeout
    while video.status not in ("completed", "failed") and time.time() < deadline:
        time.sleep(0.1)
        video = client.videos.retrieve(video.id)
    return video


def openai_app(serve_base, config, name):
    """kinoray's Serve app for `config` (a KinorayConfig), run under `/<name>`: the official
    openai client pointed at it."""
    import openai
    from ray import serve

    from kinoray.deployments.app import build

    serve.run(build(config), name=name, route_prefix=f"/{name}")
    return openai.OpenAI(base_url=f"{serve_base}/{name}/v1", api_key="x", max_retries=0)

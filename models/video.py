"""Video files: H.264 MP4 (yuv420p, playable everywhere) for clips, PNG for single frames."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np


def video_suffix(num_frames: int) -> str:
    return ".png" if num_frames == 1 else ".mp4"


def encode_video(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """uint8 frames (T, H, W, 3) -> the bytes of an MP4, or of a PNG when T == 1.

    x264 is run single-threaded so that the same frames always give the same bytes.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 1:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frames[0]).save(buf, format="PNG")
        return buf.getvalue()
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def probe_video(data: bytes) -> dict[str, object]:
    """Codec, pixel format, size, frame count and fps of an encoded MP4 (as ffprobe reports them)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": frames,
            "fps": float(stream.average_rate),
        }

"""Video files: H.264 MP4 (yuv420p, playable everywhere) for clips, PNG for single frames."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

TAG_KEY = "kinoray"


def video_suffix(num_frames: int) -> str:
    return ".png" if num_frames == 1 else ".mp4"


def encode_video(frames: np.ndarray, fps: int, crf: int = 18, tag: str | None = None) -> bytes:
    """uint8 frames (T, H, W, 3) -> the bytes of an MP4, or of a PNG when T == 1.

    x264 is run single-threaded so that the same frames always give the same bytes. `tag` is
    stored in the file's metadata (MP4 `comment`, PNG text chunk `kinoray`), read back by
    `video_tag`: a bulk job tags each video with its request's digest.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 1:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if tag is not None:
            info.add_text(TAG_KEY, tag)
        buf = io.BytesIO()
        Image.fromarray(frames[0]).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        if tag is not None:
            container.metadata["comment"] = f"{TAG_KEY}:{tag}"
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


def video_tag(data: bytes) -> str | None:
    """The tag `encode_video` stored in a file's metadata, or None (no tag, not a video)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                return im.info.get(TAG_KEY)
        import av

        with av.open(io.BytesIO(data)) as container:
            comment = container.metadata.get("comment", "")
        return comment.removeprefix(f"{TAG_KEY}:") if comment.startswith(f"{TAG_KEY}:") else None
    except Exception:
        return None


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


# The preview images of OpenAI's Videos API (`GET /v1/videos/{id}/content?variant=...`).
SPRITESHEET_FRAMES = 16
SPRITESHEET_TILE_WIDTH = 256


def thumbnail(frames: np.ndarray) -> bytes:
    """The middle frame of a clip (T, H, W, 3) uint8, at its size, as WebP (quality 90)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frames[len(frames) // 2]).save(out, format="WEBP", quality=90)
    return out.getvalue()


def spritesheet(
    frames: np.ndarray, max_frames: int = SPRITESHEET_FRAMES, tile_width: int = SPRITESHEET_TILE_WIDTH
) -> bytes:
    """Up to `max_frames` evenly spaced frames of a clip (T, H, W, 3) uint8 (first and last
    included), as one JPEG (quality 85): tiles `tile_width` pixels wide at most (aspect kept),
    left to right then top to bottom in rows of ceil(sqrt(k)) tiles."""
    from PIL import Image

    k = min(len(frames), max_frames)
    picks = np.linspace(0, len(frames) - 1, k).round().astype(int)
    h, w = frames.shape[1:3]
    tw = min(w, tile_width)
    th = max(1, round(h * tw / w))
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    sheet = Image.new("RGB", (cols * tw, rows * th))
    for n, i in enumerate(picks):
        tile = Image.fromarray(frames[i]).resize((tw, th), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((n % cols) * tw, (n // cols) * th))
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=85)
    return out.getvalue()

"""HTTP details of the API's file answers: byte ranges, HEAD, image formats."""

from __future__ import annotations

import io
import re

from fastapi import Request
from fastapi.responses import Response

from kinoray.deployments.api import APIError

IMAGE_MEDIA = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range_response(request: Request, data: bytes, media: str) -> Response:
    """`data` whole (200), or the one byte range asked for (206 with Content-Range; 416 past
    the end), per RFC 9110 section 14; several ranges are answered whole, which the RFC allows.
    A HEAD answer has the headers and no body."""
    size = len(data)
    headers = {"Accept-Ranges": "bytes"}
    status, body = 200, data
    match = _RANGE.match(request.headers.get("range", "").strip())
    # No validators (ETag, Last-Modified) are sent, so an If-Range never matches: whole file.
    if match and match.group(1) + match.group(2) and "if-range" not in request.headers:
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        else:
            start, end = max(0, size - int(last)), size - 1
        if first and last and int(last) < int(first):
            start, end = 0, -1  # an invalid range is ignored (RFC 9110 14.1.1): whole file
        elif start >= size:
            raise APIError(
                416,
                f"range {request.headers['range']!r} is outside the {size} bytes",
                param="range",
                code="range_not_satisfiable",
                headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
            )
        if end >= start:
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return Response(status_code=status, media_type=media, headers=headers)
    return Response(content=body, status_code=status, media_type=media, headers=headers)


def convert_image(png: bytes, output_format: str, quality: int | None) -> bytes:
    """A PNG as `output_format` (png, jpeg, webp); `quality` 0-100 for jpeg and webp."""
    if output_format == "png":
        return png
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(
        out, format=output_format.upper(), quality=100 if quality is None else quality
    )
    return out.getvalue()

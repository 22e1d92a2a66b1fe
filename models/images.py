"""Reference images for image-to-video: read them, check them, make them the size of the frames.

Images arrive online as an OpenAI-style `input_reference` (an uploaded file, or a `data:` or
`https://` URL) and in bulk tables as an `image` cell (a local path, an fsspec URL such as
`s3://bucket/a.png`, an http(s) URL or a `data:` URL). Everything here raises `ImageError`, with
a message meant for the user who sent the image and a stable `reason` label for metrics.

Untrusted input is bounded at every step: encoded bytes (`max_bytes`) before and while reading,
pixels (`max_pixels`) from the header before decoding, total fetch time, redirects, and which
hosts a URL may reach (`allow_private_networks`). Note that `read_image_bytes` reads any local
file or bucket the process can read: online callers should pass it only `data:` and http(s) URLs.

Imports only the standard library, Pillow and pydantic (fsspec when a path or bucket is read).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import io
import ipaddress
import os
import posixpath
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from typing import Any, Literal, NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ImageError",
    "ImagePolicy",
    "decode_image",
    "fetch_url",
    "fit_image",
    "image_digest",
    "load_image",
    "parse_data_url",
    "read_image_bytes",
]

Reason = Literal["unreadable", "too_large", "corrupt", "unsupported_format", "forbidden_url", "wrong_size"]


class ImageError(ValueError):
    """An image that cannot be used; the message says why in words a user understands.

    Messages carry no field name: callers prefix them (`input_reference: `, `image: `).
    `reason` is a short stable label:

    - ``unreadable``: the bytes could not be had (missing file, HTTP error, timeout, bad URL).
    - ``too_large``: more encoded bytes or more pixels than the policy allows.
    - ``corrupt``: the bytes are not a decodable image (or not valid base64).
    - ``unsupported_format``: a real image in a format the policy does not accept.
    - ``forbidden_url``: a URL the SSRF guard refuses (private address, credentials in it).
    - ``wrong_size``: the image is not the frame size and the policy says refuse.
    """

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.reason: str = reason


class ImagePolicy(BaseModel):
    """Limits and choices applied to every reference image."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest encoded image file, in bytes")
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="largest width*height, checked from the file header before decoding",
    )
    formats: tuple[str, ...] = Field(
        default=("PNG", "JPEG", "WEBP"),
        min_length=1,
        description="accepted Pillow format names; JPEG includes MPO (multi-picture JPEG from phones)",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="let http(s) URLs reach loopback, private, link-local, CGNAT, unique-local, "
        "site-local, multicast, reserved and unspecified addresses",
    )
    fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="total time for one URL (connect, redirects, read), in seconds"
    )
    max_redirects: int = Field(default=3, ge=0, description="redirects followed, each one re-checked")
    resize: Literal["crop", "refuse"] = Field(
        default="crop",
        description="an image of another size than the frames: scale to cover and center-crop, or refuse",
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(name.strip().upper() for name in value)
        Image.init()  # registers every plugin, so Image.OPEN lists all the names Pillow reads
        unknown = [name for name in names if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow reads {sorted(Image.OPEN)}")
        return names


def image_digest(data: bytes) -> str:
    """SHA-256 of the encoded image bytes, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


# What Pillow's plugins raise on damaged data; OSError covers truncation and unknown formats.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


def _too_many_bytes(size: int | None, cap: int) -> ImageError:
    if size is None:
        return ImageError(f"the image file is larger than the limit of {cap:,} bytes", "too_large")
    return ImageError(f"the image file is {size:,} bytes; the limit is {cap:,} bytes", "too_large")


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image.

    Checks, in order: the byte count (`max_bytes`), the format (`policy.formats`, from the file
    signature, not a file name or media type), and width*height from the header (`max_pixels`)
    before any pixel is decoded, so a decompression bomb (a tiny file that declares a huge
    image) is refused without allocating. Then it decodes fully, so a truncated file fails here
    rather than later, applies the EXIF orientation and converts to RGB.

    Sets no global Pillow state. Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`, about 89
    megapixels) still applies on top: it warns above it and refuses above twice it.

    Raises:
        ImageError: ``too_large``, ``unsupported_format`` (naming the format found) or ``corrupt``.
    """
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), policy.max_bytes)
    accepted = set(policy.formats)
    if "JPEG" in accepted:
        accepted.add("MPO")  # what Pillow calls a JPEG with extra pictures (phones write them)
    try:
        # Only the accepted plugins parse the header: less of Pillow sees hostile bytes.
        with Image.open(io.BytesIO(data), formats=list(policy.formats)) as im:
            if im.format not in accepted:
                raise _unsupported(im.format, policy)
            width, height = im.size
            if width * height > policy.max_pixels:
                raise ImageError(
                    f"the image is {width}x{height} ({width * height:,} pixels); "
                    f"the limit is {policy.max_pixels:,} pixels",
                    "too_large",
                )
            im.load()
            upright = ImageOps.exif_transpose(im)
            # As diffusers.utils.load_image does: EXIF orientation, then convert("RGB"), which
            # drops alpha (no compositing). Its convert clips 16-bit samples to 0..255 (a mid-gray
            # 16-bit PNG would turn white): they are scaled to 8 bits first.
            return _eight_bit(upright).convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"the image has far more pixels than the limit of {policy.max_pixels:,}", "too_large"
        ) from None
    except UnidentifiedImageError:
        found = _identify(data)
        if found is not None:
            raise _unsupported(found, policy) from None
        raise ImageError(
            f"the data is not an image in an accepted format ({', '.join(policy.formats)})", "corrupt"
        ) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"the image is damaged or truncated ({e})", "corrupt") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """An image of 16-bit (or 32-bit integer) samples, as 16-bit grayscale PNGs load, scaled to
    8 bits; other images as they are."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    import numpy as np

    samples = np.asarray(image, dtype=np.int64)
    return Image.fromarray(np.clip(samples >> 8, 0, 255).astype(np.uint8), mode="L")


def _identify(data: bytes) -> str | None:
    """The format any Pillow plugin recognises from the header (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except (Image.DecompressionBombError, *_DECODE_ERRORS):
        return None


def _unsupported(found: str | None, policy: ImagePolicy) -> ImageError:
    return ImageError(
        f"{found} images are not accepted; use {', '.join(policy.formats)}", "unsupported_format"
    )


def fit_image(
    image: Image.Image, width: int, height: int, mode: Literal["crop", "refuse"] = "crop"
) -> Image.Image:
    """Make `image` exactly `width` x `height` pixels.

    ``crop`` scales it (Lanczos, keeping the aspect ratio) to cover the target and cuts the
    overflow evenly from both sides; an image already of that size is returned as it is.
    ``refuse`` returns the image if its size matches, else raises.

    Raises:
        ImageError: ``wrong_size`` in ``refuse`` mode when the size differs.
        ValueError: a width or height below 1, or an unknown mode.
    """
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if image.size == (width, height):
        return image
    if mode == "refuse":
        w, h = image.size
        raise ImageError(f"the image is {w}x{h}; this request makes {width}x{height} frames", "wrong_size")
    if mode != "crop":
        raise ValueError(f"mode must be 'crop' or 'refuse', got {mode!r}")
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def parse_data_url(url: str, policy: ImagePolicy) -> bytes:
    """The bytes of an RFC 2397 data URL, ``data:[<mediatype>][;base64],<data>``.

    Only base64 data is accepted, with an ``image/*`` media type or none (RFC 2397 would read
    none as text/plain; clients that omit it mean an image here). The base64 is strict
    (RFC 4648 alphabet and padding) once whitespace is dropped: wrapped lines are fine. A payload whose length implies more than
    `max_bytes` is refused before it is decoded. The media type is not trusted: `decode_image`
    identifies the format from the bytes.

    Raises:
        ImageError: ``unreadable`` (not a data URL, or not base64), ``unsupported_format``
        (a media type other than image/*), ``too_large``, ``corrupt`` (invalid base64).
    """
    scheme, sep, rest = url.strip().partition(":")
    if scheme.lower() != "data" or not sep:
        raise ImageError("not a data URL (expected data:image/...;base64,...)", "unreadable")
    header, comma, payload = rest.partition(",")
    if not comma:
        raise ImageError("malformed data URL: no comma before the data", "unreadable")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"the data URL holds {media_type}, not an image (image/*)", "unsupported_format")
    if not params or params[-1].strip().lower() != "base64":
        raise ImageError("only base64 data URLs are accepted (data:image/...;base64,...)", "unreadable")
    # Line breaks and spaces are not base64 (RFC 4648), but `base64` and MIME tools wrap
    # their output (RFC 2045): they are dropped.
    payload = "".join(payload.split())
    if len(payload) > 4 * -(-policy.max_bytes // 3):  # the base64 length of max_bytes bytes
        raise _too_many_bytes(len(payload) // 4 * 3, policy.max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL's base64 is invalid", "corrupt") from None
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), policy.max_bytes)
    return data


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = {"User-Agent": "kinoray (reference image fetch)", "Accept": "image/*"}
_CHUNK = 64 * 1024


class _Target(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str
    addrs: list[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]  # getaddrinfo results


def _shown(url: str) -> str:
    """The URL without query or fragment: signed URLs carry credentials there."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d and 6to4 2002:wwxx:yyzz:: reach the IPv4 address they embed.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _refused_address(embedded)
        if ip.is_site_local:
            return True
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global  # also 100.64.0.0/10 (CGNAT), which is neither private nor global
    )


def _target(url: str, policy: ImagePolicy, deadline: float) -> _Target:
    """Parse `url` and resolve its host once; refuse it if the SSRF guard says so."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError(f"invalid URL ({e})", "unreadable") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"only http(s) URLs can be fetched, not {scheme or 'this'}: URLs", "unreadable")
    if "@" in parts.netloc:
        raise ImageError("URLs with a user name or password are not accepted", "forbidden_url")
    host = parts.hostname
    if not host:
        raise ImageError(f"the URL has no host: {_shown(url)}", "unreadable")
    port = port or (443 if scheme == "https" else 80)
    _remaining(deadline, policy, url)
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise ImageError(f"cannot resolve {host} ({e})", "unreadable") from None
    if not policy.allow_private_networks:
        for *_, sockaddr in addrs:
            if _refused_address(ipaddress.ip_address(sockaddr[0])):
                raise ImageError(
                    f"{host} is a private or reserved network address; only public URLs can be fetched",
                    "forbidden_url",
                )
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    return _Target(scheme, host, port, path, addrs)


def _remaining(deadline: float, policy: ImagePolicy, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(policy, url)
    return left


def _timed_out(policy: ImagePolicy, url: str) -> ImageError:
    return ImageError(f"timed out after {policy.fetch_timeout_s:g} s fetching {_shown(url)}", "unreadable")


def _connect(target: _Target, policy: ImagePolicy, deadline: float, url: str) -> socket.socket:
    """A socket connected to one of the addresses the guard checked (never a fresh lookup)."""
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in target.addrs:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_remaining(deadline, policy, url))
            sock.connect(sockaddr)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            error = e
    assert error is not None  # getaddrinfo returns at least one address or raises
    raise error


class _Watchdog:
    """Shuts a connection's socket down at the deadline.

    Socket timeouts bound each read, not their sum: a server trickling its headers a byte at a
    time would outlast them. Shutting the socket down wakes the reader wherever it waits.
    """

    def __init__(self, deadline: float) -> None:
        self.sock: socket.socket | None = None
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self.sock
        if sock is not None:
            # The plain socket call, also on a TLS socket: SSLSocket.shutdown would drop its TLS
            # state under the thread reading it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _get(target: _Target, policy: ImagePolicy, deadline: float, url: str) -> bytes | str:
    """One GET: the body, or the Location of a redirect."""
    watchdog = _Watchdog(deadline)
    conn: http.client.HTTPConnection | None = None
    try:
        sock = watchdog.sock = _connect(target, policy, deadline, url)
        if target.scheme == "https":
            context = ssl.create_default_context()
            # The certificate is checked against the host name (and SNI sent for it), while the
            # socket stays connected to the checked address.
            sock = context.wrap_socket(sock, server_hostname=target.host)
            watchdog.sock = sock
            conn = http.client.HTTPSConnection(target.host, target.port, context=context)
        else:
            conn = http.client.HTTPConnection(target.host, target.port)
        conn.sock = sock  # http.client then skips its own connect (and its own DNS lookup)
        sock.settimeout(_remaining(deadline, policy, url))
        conn.request("GET", target.path, headers=_HEADERS)
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise ImageError(f"{_shown(url)} redirects without a Location", "unreadable")
            return location
        if not 200 <= response.status < 300:
            raise ImageError(
                f"{_shown(url)} answered HTTP {response.status} {response.reason}".rstrip(), "unreadable"
            )
        declared = response.length
        if declared is not None and declared > policy.max_bytes:
            raise _too_many_bytes(declared, policy.max_bytes)
        chunks: list[bytes] = []
        received = 0
        while chunk := response.read1(_CHUNK):  # one read at a time: the deadline is checked often
            received += len(chunk)
            if received > policy.max_bytes:
                raise _too_many_bytes(None, policy.max_bytes)
            chunks.append(chunk)
            sock.settimeout(_remaining(deadline, policy, url))
        if watchdog.fired:  # it ends a read as an early end of the body would
            raise _timed_out(policy, url)
        if declared is not None and received < declared:
            raise ImageError(
                f"{_shown(url)} closed the connection after {received:,} of {declared:,} bytes",
                "unreadable",
            )
        return b"".join(chunks)
    except (OSError, http.client.HTTPException):
        if watchdog.fired:
            raise _timed_out(policy, url) from None
        raise
    finally:
        watchdog.cancel()
        if conn is not None:
            conn.close()
        elif watchdog.sock is not None:
            watchdog.sock.close()


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """GET an http(s) URL with the SSRF guard, redirect, size and time limits of `policy`.

    Each hop's host is resolved once; unless `allow_private_networks`, the URL is refused if
    any address it resolves to is loopback, private, link-local, CGNAT (100.64.0.0/10),
    unique-local, site-local, multicast, reserved or unspecified (IPv4-mapped and 6to4 IPv6
    addresses are judged by their IPv4 address). The connection goes to a checked address, not
    to a second lookup, so DNS rebinding cannot slip in; the Host header, SNI and certificate
    check still use the host name. URLs with credentials in them are refused.

    Redirects 301, 302, 303, 307 and 308 are followed up to `max_redirects`, each re-checked.
    A Content-Length over `max_bytes` is refused before reading, and reading stops as soon as
    more than `max_bytes` arrive. The whole fetch, redirects included, is bounded by
    `fetch_timeout_s`: socket timeouts set to the time left, a check between reads, and a
    watchdog that shuts the socket at the deadline (a server trickling bytes cannot outlast
    it). Name resolution is the system resolver's and has no timeout of its own.

    Raises:
        ImageError: ``forbidden_url``, ``too_large``, or ``unreadable`` (not http(s), HTTP
        status other than 2xx, too many redirects, timeout, connection or TLS error).
    """
    deadline = time.monotonic() + policy.fetch_timeout_s
    for _ in range(policy.max_redirects + 1):
        try:
            target = _target(url, policy, deadline)
            result = _get(target, policy, deadline, url)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError):
                raise _timed_out(policy, url) from None
            raise ImageError(f"cannot fetch {_shown(url)} ({e or type(e).__name__})", "unreadable") from None
        if isinstance(result, bytes):
            return result
        url = urllib.parse.urljoin(url, result)
    raise ImageError(f"too many redirects (more than {policy.max_redirects})", "unreadable")


def _resolve_path(ref: str, base: str | None) -> str:
    """`ref` as an absolute local path or an fsspec URL, a relative one taken against `base`."""
    if ref.startswith("~"):
        ref = os.path.expanduser(ref)
    if "://" in ref or "::" in ref or os.path.isabs(ref):
        return ref
    if base is None:
        return os.path.abspath(ref)
    base = os.path.expanduser(base)
    if "://" in base:
        protocol, _, folder = base.partition("://")
        return f"{protocol}://{posixpath.normpath(folder.rstrip('/') + '/' + ref)}"
    return os.path.abspath(os.path.join(base, ref))


def read_image_bytes(ref: str, policy: ImagePolicy, base: str | None = None) -> bytes:
    """The encoded bytes of one image reference, as found in a table cell or sent online.

    - ``data:...``: an RFC 2397 data URL (`parse_data_url`).
    - ``http://...``, ``https://...``: fetched with the SSRF guard (`fetch_url`).
    - anything else: an fsspec URL (``s3://bucket/a.png``, ``file:///x.png``) or a local path
      (``/abs/x.png``, ``~/x.png``, ``rel/x.png``). A relative path is taken against `base`, a
      folder path or URL such as the folder of the prompt table (``s3://bucket/folder``), or
      the current directory when `base` is None.

    Files larger than `max_bytes` are refused from their listed size when the filesystem gives
    one, and reading stops after `max_bytes` + 1 bytes in any case.

    Raises:
        ImageError: ``unreadable`` (empty reference, no such file, permission or storage
        error) and ``too_large``; for data and http(s) URLs, those of their readers.
    """
    ref = ref.strip()
    if not ref:
        raise ImageError("the image reference is empty", "unreadable")
    lowered = ref[:8].lower()
    if lowered.startswith("data:"):
        return parse_data_url(ref, policy)
    if lowered.startswith(("http://", "https://")):
        return fetch_url(ref, policy)

    import fsspec.core  # imported here: it takes longer to import than the rest of this module

    url = _resolve_path(ref, base)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        size = fs.size(path)
        if size is not None and size > policy.max_bytes:
            raise _too_many_bytes(size, policy.max_bytes)
        with fs.open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"no such file: {url}", "unreadable") from None
    except IsADirectoryError:
        raise ImageError(f"{url} is a folder, not an image file", "unreadable") from None
    except PermissionError:
        raise ImageError(f"permission denied reading {url}", "unreadable") from None
    except Exception as e:  # each storage backend raises its own errors
        raise ImageError(f"cannot read {url} ({e or type(e).__name__})", "unreadable") from None
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(None, policy.max_bytes)
    return data


def load_image(ref: str | bytes, policy: ImagePolicy, base: str | None = None) -> tuple[Image.Image, str]:
    """Read (unless given bytes, such as an upload) and decode one image.

    Returns the upright RGB image and the `image_digest` of its encoded bytes.

    Raises:
        ImageError: as `read_image_bytes` and `decode_image`.
    """
    data = (
        bytes(ref) if isinstance(ref, (bytes, bytearray, memoryview)) else read_image_bytes(ref, policy, base)
    )
    return decode_image(data, policy), image_digest(data)

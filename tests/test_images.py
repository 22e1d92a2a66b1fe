"""Reference images: decoding, bombs, fitting, data URLs, the SSRF-guarded fetch and table paths."""

import base64
import hashlib
import io
import random
import socket
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import free_port
from PIL import Image, ImageFile
from pydantic import ValidationError

from kinoray.models import images
from kinoray.models.images import (
    ImageError,
    ImagePolicy,
    decode_image,
    fetch_url,
    fit_image,
    image_digest,
    load_image,
    parse_data_url,
    read_image_bytes,
)

POLICY = ImagePolicy()
OPEN = ImagePolicy(allow_private_networks=True)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def png_header(width: int, height: int) -> bytes:
    """A valid-looking PNG that declares width x height but holds a few hundred bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def refused(reason: str, call, *args, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        call(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value


# Decoding


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_accepted_format_decodes_to_rgb_of_its_size(fmt):
    image = decode_image(encode(noise(48, 32), fmt), POLICY)
    assert (image.mode, image.size) == ("RGB", (48, 32))


@pytest.mark.parametrize(
    "source, fmt",
    [
        (Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
        (Image.new("RGB", (20, 10), "red").convert("P"), "PNG"),
        (Image.new("L", (20, 10), 128), "JPEG"),
        (Image.new("I;16", (20, 10), 1000), "PNG"),
    ],
    ids=["rgba-png", "palette-png", "gray-jpeg", "16bit-png"],
)
def test_other_modes_come_out_rgb(source, fmt):
    image = decode_image(encode(source, fmt), POLICY)
    assert (image.mode, image.size) == ("RGB", (20, 10))


def test_rgba_drops_alpha_like_diffusers():
    image = decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"), POLICY)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_phone_photo_is_turned_upright_by_its_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    assert decode_image(data, POLICY).size == (20, 40)


def test_multi_picture_jpeg_counts_as_jpeg():
    data = encode(
        Image.new("RGB", (16, 8), "red"), "MPO", save_all=True, append_images=[Image.new("RGB", (16, 8))]
    )
    image = decode_image(data, ImagePolicy(formats=("JPEG",)))
    assert image.size == (16, 8) and image.getpixel((8, 4))[0] > 200


def test_truncated_and_random_bytes_are_corrupt():
    data = encode(noise(64, 64), "PNG")
    refused("corrupt", decode_image, data[: len(data) // 2], POLICY)
    refused("corrupt", decode_image, random.Random(1).randbytes(2000), POLICY)
    refused("corrupt", decode_image, b"", POLICY)


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_other_formats_are_refused_by_name(fmt):
    err = refused("unsupported_format", decode_image, encode(Image.new("RGB", (8, 8)), fmt), POLICY)
    assert fmt in str(err) and "PNG, JPEG, WEBP" in str(err)


def test_policy_formats_choose_what_is_accepted():
    only_png = ImagePolicy(formats=("png",))
    assert only_png.formats == ("PNG",)
    refused("unsupported_format", decode_image, encode(Image.new("RGB", (8, 8)), "JPEG"), only_png)
    with pytest.raises(ValidationError, match="JPG"):
        ImagePolicy(formats=("JPG",))
    with pytest.raises(ValidationError):
        ImagePolicy(max_byte=1)


def test_more_bytes_than_the_cap_is_too_large():
    data = encode(noise(64, 64), "PNG")
    err = refused("too_large", decode_image, data, ImagePolicy(max_bytes=len(data) - 1))
    assert f"{len(data):,} bytes" in str(err)


@pytest.mark.parametrize("side", [50_000, 6_000], ids=["beyond-pillow-guard", "beyond-policy-only"])
def test_decompression_bomb_is_refused_from_its_header(side):
    data = png_header(side, side)
    assert len(data) < 200
    guards = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    start = time.perf_counter()
    err = refused("too_large", decode_image, data, POLICY)
    assert time.perf_counter() - start < 1.0
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == guards
    if side == 6_000:
        assert "6000x6000" in str(err) and "16,777,216" in str(err)


def test_real_compressible_image_over_max_pixels_is_refused_before_decoding():
    data = encode(Image.new("RGB", (2000, 2000)), "PNG")
    assert len(data) < 50_000
    start = time.perf_counter()
    err = refused("too_large", decode_image, data, ImagePolicy(max_pixels=1_000_000))
    assert time.perf_counter() - start < 1.0
    assert "2000x2000" in str(err)


def test_load_image_returns_the_digest_of_the_encoded_bytes(tmp_path):
    data = encode(noise(8, 8), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    image, digest = load_image(data, POLICY)
    assert image.size == (8, 8) and digest == hashlib.sha256(data).hexdigest() == image_digest(data)
    assert load_image("a.png", POLICY, base=str(tmp_path))[1] == digest


# Fitting


def bullseye() -> Image.Image:
    image = Image.new("RGB", (300, 200), "blue")
    image.paste(Image.new("RGB", (100, 100), "red"), (100, 50))
    return image


@pytest.mark.parametrize("size", [(64, 64), (80, 48), (48, 80), (600, 400)])
def test_crop_gives_the_exact_size_and_keeps_the_center(size):
    out = fit_image(bullseye(), *size)
    assert out.size == size
    red, blue = out.getpixel((size[0] // 2, size[1] // 2)), out.getpixel((0, 0))
    assert red[0] > 200 and red[2] < 50
    assert blue[2] > 200 and blue[0] < 50


def test_same_size_is_returned_untouched():
    image = noise(32, 16)
    assert fit_image(image, 32, 16).tobytes() == image.tobytes()
    assert fit_image(image, 32, 16, mode="refuse").tobytes() == image.tobytes()


def test_refuse_mode_names_both_sizes():
    err = refused("wrong_size", fit_image, bullseye(), 64, 48, mode="refuse")
    assert "is 300x200; this request makes 64x48 frames" in str(err)


# Data URLs


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def test_data_url_gives_its_bytes():
    data = encode(noise(8, 8), "PNG")
    assert parse_data_url(data_url(data), POLICY) == data
    assert parse_data_url(data_url(data, media=""), POLICY) == data
    assert parse_data_url(data_url(data, media="IMAGE/PNG;name=a.png"), POLICY) == data
    assert read_image_bytes(" " + data_url(data), POLICY) == data


def test_data_url_refusals():
    png = encode(noise(8, 8), "PNG")
    refused("unsupported_format", parse_data_url, data_url(png, "text/plain"), POLICY)
    refused("corrupt", parse_data_url, "data:image/png;base64,iVBOR*w0K", POLICY)
    refused("corrupt", parse_data_url, "data:image/png;base64,iVBORw0", POLICY)  # no padding
    refused("unreadable", parse_data_url, "data:image/png,rawbytes", POLICY)
    refused("unreadable", parse_data_url, "data:image/png;base64", POLICY)
    refused("unreadable", parse_data_url, "image/png;base64,AAAA", POLICY)


def test_oversized_data_url_is_refused_before_decoding():
    refused("too_large", parse_data_url, "data:image/png;base64," + "*" * 200, ImagePolicy(max_bytes=100))
    png = encode(noise(8, 8), "PNG")
    refused("too_large", parse_data_url, data_url(png), ImagePolicy(max_bytes=len(png) - 1))
    assert parse_data_url(data_url(png), ImagePolicy(max_bytes=len(png))) == png


# Fetching


PNG = encode(noise(16, 16), "PNG")
SMALL_CAP = 10_000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append((self.path, self.headers))
        if self.path == "/img.png":
            self.reply(200, PNG)
        elif self.path == "/redirect":
            self.reply(302, b"", Location="/img.png")
        elif self.path == "/to-metadata":
            self.reply(302, b"", Location="http://169.254.169.254/latest/meta-data/")
        elif self.path == "/loop":
            self.reply(301, b"", Location="/loop")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.flush()
            self.server.release.wait(5)
            self.wfile.write(PNG)
        elif self.path == "/endless":  # no Content-Length: the body ends when the connection does
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x" * SMALL_CAP)
            except OSError:
                pass
        elif self.path == "/trickle":  # headers a byte at a time, each well within the socket timeout
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                while not self.server.release.wait(0.05):
                    self.wfile.write(b"a")
            except OSError:
                pass
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG) + 100))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        else:
            self.reply(404, b"not here")

    def reply(self, status, body, **headers):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


def serve(context: ssl.SSLContext | None = None):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.seen, server.release = [], threading.Event()
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_server():
    server = serve()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def web(http_server):
    http_server.seen.clear()
    return http_server, f"http://127.0.0.1:{http_server.server_address[1]}"


@pytest.fixture
def fake_dns(monkeypatch):
    """*.test names resolve to 127.0.0.1; every lookup is recorded."""
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        return real("127.0.0.1" if str(host).endswith(".test") else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_loopback_is_refused_by_default_without_a_request(web):
    server, base = web
    refused("forbidden_url", fetch_url, f"{base}/img.png", POLICY)
    refused("forbidden_url", read_image_bytes, f"{base}/img.png", POLICY)
    assert server.seen == []


def test_fetch_when_private_networks_are_allowed(web):
    server, base = web
    assert fetch_url(f"{base}/img.png", OPEN) == PNG
    _, headers = server.seen[0]
    assert "kinoray" in headers["User-Agent"] and headers["Accept"] == "image/*"
    image, digest = load_image(f"{base}/img.png", OPEN)
    assert image.size == (16, 16) and digest == image_digest(PNG)


def test_name_is_resolved_once_and_sent_as_host(web, fake_dns):
    server, base = web
    port = server.server_address[1]
    assert fetch_url(f"http://images.test:{port}/img.png", OPEN) == PNG
    assert fake_dns == ["images.test"]
    assert server.seen[0][1]["Host"] == f"images.test:{port}"


def test_a_name_with_any_private_address_is_refused(web, monkeypatch):
    def public_and_private(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", public_and_private)
    refused("forbidden_url", fetch_url, "http://rebind.test/img.png", POLICY)
    assert web[0].seen == []


def test_redirects_are_followed_and_each_hop_checked(web, monkeypatch):
    server, base = web
    assert fetch_url(f"{base}/redirect", OPEN) == PNG
    assert [path for path, _ in server.seen] == ["/redirect", "/img.png"]
    refused(
        "unreadable", fetch_url, f"{base}/loop", ImagePolicy(allow_private_networks=True, max_redirects=2)
    )
    assert len(server.seen) == 2 + 3
    # The guard as it is, except that this test's own server is trusted.
    guard = images._refused_address
    monkeypatch.setattr(images, "_refused_address", lambda ip: str(ip) != "127.0.0.1" and guard(ip))
    assert fetch_url(f"{base}/img.png", POLICY) == PNG
    refused("forbidden_url", fetch_url, f"{base}/to-metadata", POLICY)


def test_http_error_is_unreadable_and_names_the_status(web):
    err = refused("unreadable", fetch_url, f"{web[1]}/missing?token=secret", OPEN)
    assert "404" in str(err) and "secret" not in str(err)


def test_slow_server_times_out_at_the_policy_limit(web):
    start = time.perf_counter()
    err = refused(
        "unreadable",
        fetch_url,
        f"{web[1]}/slow",
        ImagePolicy(allow_private_networks=True, fetch_timeout_s=0.5),
    )
    assert 0.4 < time.perf_counter() - start < 1.5
    assert "timed out after 0.5 s" in str(err)


def test_server_trickling_headers_cannot_outlast_the_limit(web):
    start = time.perf_counter()
    err = refused(
        "unreadable",
        fetch_url,
        f"{web[1]}/trickle",
        ImagePolicy(allow_private_networks=True, fetch_timeout_s=0.5),
    )
    assert time.perf_counter() - start < 1.5
    assert "timed out after 0.5 s" in str(err)


def test_body_shorter_than_its_length_is_unreadable(web):
    err = refused("unreadable", fetch_url, f"{web[1]}/short", OPEN)
    assert f"after {len(PNG):,} of {len(PNG) + 100:,} bytes" in str(err)


def test_body_over_the_cap_is_cut_off(web):
    policy = ImagePolicy(allow_private_networks=True, max_bytes=SMALL_CAP)
    refused("too_large", fetch_url, f"{web[1]}/endless", policy)
    start = time.perf_counter()
    refused("too_large", fetch_url, f"{web[1]}/huge", policy)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "169.254.169.254",
        "[::1]",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "100.64.0.1",
        "224.0.0.1",
        "[fd00::1]",
        "[2002:7f00:1::]",
    ],
)
def test_guard_refuses_private_and_reserved_hosts_without_connecting(host, monkeypatch):
    def connect(*args):
        raise AssertionError("connected")

    monkeypatch.setattr(socket.socket, "connect", connect)
    refused("forbidden_url", fetch_url, f"http://{host}/latest/meta-data/", POLICY)
    refused("forbidden_url", fetch_url, f"https://{host}:8443/a.png", POLICY)


def test_credentials_and_other_schemes_are_refused(web):
    port = web[0].server_address[1]
    err = refused("forbidden_url", fetch_url, f"http://user:pw@127.0.0.1:{port}/img.png", OPEN)
    assert "pw" not in str(err)
    refused("unreadable", fetch_url, "ftp://127.0.0.1/a.png", OPEN)
    refused("unreadable", fetch_url, "file:///etc/passwd", OPEN)
    assert web[0].seen == []


# HTTPS: the certificate and SNI use the name while the socket goes to the checked address.


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server = serve(context)
    yield server, str(cert_file), names
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_against_the_name(tls, fake_dns, monkeypatch):
    server, cafile, names = tls
    port = server.server_address[1]
    err = refused("unreadable", fetch_url, f"https://images.test:{port}/img.png", OPEN)
    assert "certificate verify failed" in str(err)  # self-signed, so untrusted by default
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda: real(cafile=cafile))
    assert fetch_url(f"https://images.test:{port}/img.png", OPEN) == PNG
    assert names[-1] == "images.test" and server.seen[-1][1]["Host"] == f"images.test:{port}"
    err = refused("unreadable", fetch_url, f"https://other.test:{port}/img.png", OPEN)
    assert "not valid for 'other.test'" in str(err)


# Paths and buckets


def test_paths_local_relative_home_and_file_urls(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    data = encode(noise(8, 8), "PNG")
    (tmp_path / "in" / "a.png").write_bytes(data)
    assert read_image_bytes("a.png", POLICY, base=str(tmp_path / "in")) == data
    assert read_image_bytes("in/a.png", POLICY, base=f"{tmp_path}/") == data
    assert read_image_bytes("../in/a.png", POLICY, base=f"file://{tmp_path}/in") == data
    assert read_image_bytes(str(tmp_path / "in" / "a.png"), POLICY, base="/elsewhere") == data
    assert read_image_bytes((tmp_path / "in" / "a.png").as_uri(), POLICY) == data
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_image_bytes("~/in/a.png", POLICY) == data
    monkeypatch.chdir(tmp_path / "in")
    assert read_image_bytes("a.png", POLICY) == data


def test_path_refusals(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 100)
    err = refused("unreadable", read_image_bytes, "b.png", POLICY, base=str(tmp_path))
    assert str(err) == f"no such file: {tmp_path / 'b.png'}"
    refused("too_large", read_image_bytes, "a.png", ImagePolicy(max_bytes=99), base=str(tmp_path))
    assert read_image_bytes("a.png", ImagePolicy(max_bytes=100), base=str(tmp_path)) == b"x" * 100
    refused("unreadable", read_image_bytes, str(tmp_path), POLICY)
    refused("unreadable", read_image_bytes, "  ", POLICY)
    refused("unreadable", read_image_bytes, "nosuchprotocol://x/a.png", POLICY)


def test_s3_keys_absolute_and_relative(monkeypatch):
    import fsspec
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        S3FileSystem.clear_instance_cache()  # an instance cached for another endpoint must not serve here
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("pics")
        data = encode(noise(8, 8), "PNG")
        fs.pipe("pics/folder/a.png", data)
        assert read_image_bytes("s3://pics/folder/a.png", POLICY) == data
        assert read_image_bytes("a.png", POLICY, base="s3://pics/folder") == data
        assert read_image_bytes("folder/a.png", POLICY, base="s3://pics/") == data
        image, digest = load_image("folder/a.png", POLICY, base="s3://pics")
        assert image.size == (8, 8) and digest == image_digest(data)
        err = refused("unreadable", read_image_bytes, "s3://pics/folder/b.png", POLICY)
        assert "no such file: s3://pics/folder/b.png" in str(err)
        refused("too_large", read_image_bytes, "s3://pics/folder/a.png", ImagePolicy(max_bytes=len(data) - 1))
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_a_16_bit_grayscale_png_keeps_its_gray():
    import io

    import numpy as np
    from PIL import Image

    from kinoray.models.images import ImagePolicy, decode_image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(buf, "PNG")  # 30000 / 65535: 46% gray
    rgb = np.asarray(decode_image(buf.getvalue(), ImagePolicy()))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - 30000 * 255 // 65535) <= 1


def test_a_data_url_with_wrapped_base64_lines_is_read():
    import base64
    import io

    from PIL import Image

    from kinoray.models.images import ImagePolicy, parse_data_url

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, "PNG")
    encoded = base64.encodebytes(buf.getvalue()).decode()  # 76-character lines, as `base64` writes
    assert "\n" in encoded.strip()
    assert parse_data_url("data:image/png;base64," + encoded, ImagePolicy()) == buf.getvalue()

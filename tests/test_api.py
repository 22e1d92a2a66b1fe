"""The HTTP surface's parsing, without a server: bodies -> requests, errors naming the field sent."""

import json

import pytest

from kinoray.deployments.api import APIError, parse_create, parse_images
from kinoray.models.config import KinorayConfig

BUILDER = KinorayConfig().request_builder()
MODELS = ["tiny-wan", "sora-2"]


def create(**body):
    return parse_create({"prompt": "a fox", **body}, MODELS, BUILDER, "video_1")


@pytest.mark.parametrize("size", ["1280x720", "720x1280", "1792x1024", "1024x1792", "8x8", "100x64"])
def test_a_size_the_model_cannot_make_is_a_400_naming_size(size):
    with pytest.raises(APIError) as info:
        create(size=size)
    assert (info.value.status, info.value.param) == (400, "size")
    assert size in info.value.message


@pytest.mark.parametrize("seconds", ["40", 40, "600"])
def test_a_length_the_model_cannot_make_is_a_400_naming_seconds(seconds):
    with pytest.raises(APIError) as info:
        create(seconds=seconds)
    assert (info.value.status, info.value.param) == (400, "seconds")


def test_explicit_fields_are_named_as_sent():
    with pytest.raises(APIError) as info:
        create(height=100)
    assert info.value.param == "height"


def test_size_and_seconds_become_the_request_shape():
    req, model = create(size="96x64", seconds="2", model="sora-2")
    s = req.sampling
    assert (s.width, s.height, s.num_frames, model) == (96, 64, 17, "sora-2")


def test_images_on_the_default_model_refuse_a_size_it_cannot_hold():
    with pytest.raises(APIError) as info:
        parse_images({"prompt": "x", "size": "1024x1024"}, MODELS, BUILDER, ["img_1"])
    assert (info.value.status, info.value.param) == (400, "size")


@pytest.mark.parametrize("seconds", ["0.01", 0.2, "40"])
def test_a_length_outside_the_model_is_a_400_in_seconds_not_frames(seconds):
    with pytest.raises(APIError) as info:
        create(seconds=seconds)
    assert (info.value.status, info.value.param) == (400, "seconds")
    # The message speaks of what the client sent and what it may send, in seconds.
    assert "num_frames" not in info.value.message and "seconds must be between" in info.value.message


def test_a_video_request_for_one_frame_is_a_400():
    with pytest.raises(APIError) as info:
        create(num_frames=1)
    assert (info.value.status, info.value.param) == (400, "num_frames")
    assert "images/generations" in info.value.message


def test_an_image_model_refuses_the_videos_api_naming_model():
    builder = KinorayConfig.model_validate({"model": {"weights": "tiny-flux"}}).request_builder()
    with pytest.raises(APIError) as info:
        parse_create({"prompt": "x"}, ["tiny-flux"], builder, "video_1")
    assert (info.value.status, info.value.param) == (400, "model")


@pytest.mark.parametrize("field", ["guidance_scale", "seconds"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-Infinity"])
def test_non_finite_numbers_are_400s_naming_the_field(field, value):
    with pytest.raises(APIError) as info:
        create(**{field: value})
    assert (info.value.status, info.value.param) == (400, field)


def test_a_model_that_is_not_served_is_a_404_naming_model():
    with pytest.raises(APIError) as info:
        create(model="veo-3")
    assert (info.value.status, info.value.param) == (404, "model")


def test_images_accept_what_openai_clients_send_by_default():
    body = {
        "prompt": "x",
        "size": "auto",
        "quality": "auto",
        "moderation": "auto",
        "background": "auto",
        "stream": False,
        "output_format": "webp",
        "output_compression": 80,
        "n": 2,
    }
    parsed, reqs = parse_images(body, MODELS, BUILDER, ["img_1", "img_2"])
    assert len(reqs) == 2 and parsed.output_format == "webp"
    assert all(r.sampling.num_frames == 1 for r in reqs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("background", "transparent"),
        ("stream", True),
        ("quality", "hd"),
        ("moderation", "low"),
        ("style", "natural"),
    ],
)
def test_images_refuse_by_name_what_kinoray_cannot_honour(field, value):
    with pytest.raises(APIError) as info:
        parse_images({"prompt": "x", field: value}, MODELS, BUILDER, ["img_1"])
    assert (info.value.status, info.value.param) == (400, field)
    assert repr(value) in info.value.message


def test_webhook_signatures_verify_with_the_official_client():
    import base64
    import time

    import openai

    from kinoray.deployments.webhooks import event, signature_headers

    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    payload = event("video.completed", "video_1")
    body = json.dumps(payload).encode()
    headers = signature_headers(secret, payload["id"], int(time.time()), body)
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9", webhook_secret=secret)
    unwrapped = client.webhooks.unwrap(body, headers)
    assert (unwrapped.type, unwrapped.data.id) == ("video.completed", "video_1")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body + b" ", headers)


@pytest.mark.parametrize("fps", [0, "0", -1, 1000])
def test_a_bad_fps_with_seconds_is_a_400_naming_fps(fps):
    with pytest.raises(APIError) as info:
        create(seconds="1", fps=fps)
    assert (info.value.status, info.value.param) == (400, "fps")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"size": "64x64", "height": 128}, "height"),
        ({"seconds": "4", "num_frames": 9}, "num_frames"),
        ({"seconds": True}, "seconds"),
        ({"seed": True}, "seed"),
        ({"size": "64x"}, "size"),
        ({"size": "１２８x64"}, "size"),
    ],
)
def test_contradictory_and_mistyped_fields_are_400s_naming_one(body, param):
    with pytest.raises(APIError) as info:
        create(**body)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "invalid_value")


def test_images_take_null_for_the_fields_openai_lets_be_null():
    body, reqs = parse_images(
        {"prompt": "x", "n": None, "response_format": None, "output_format": None}, MODELS, BUILDER, ["img_1"]
    )
    assert (len(reqs), body.response_format, body.output_format) == (1, "b64_json", "png")


def test_input_reference_is_a_400_naming_it_where_the_model_cannot_use_it():
    # A text-to-video model refuses an image; an image-to-video model requires one.
    with pytest.raises(APIError) as info:
        create(input_reference="data:image/png;base64,AAAA")
    assert (info.value.status, info.value.param) == (400, "input_reference")
    assert "does not take a reference image" in info.value.message
    i2v = KinorayConfig.model_validate({"model": {"weights": "tiny-wan-i2v"}}).request_builder()
    with pytest.raises(APIError) as info:
        parse_create({"prompt": "a fox"}, ["tiny-wan-i2v"], i2v, "video_1")
    assert (info.value.status, info.value.param) == (400, "input_reference")
    # The request's own `image` field is no API field: a client never names a server path.
    with pytest.raises(APIError) as info:
        parse_create({"prompt": "a fox", "image": "/etc/passwd"}, ["tiny-wan-i2v"], i2v, "video_1")
    assert (info.value.status, info.value.param) == (400, "image")


def test_a_flood_of_reference_image_urls_is_a_429_not_a_queue(monkeypatch):
    import asyncio

    from kinoray.deployments import api
    from kinoray.models.images import ImagePolicy

    monkeypatch.setattr(api, "_fetching", api.MAX_FETCHES)  # every fetch thread busy
    with pytest.raises(APIError) as info:
        asyncio.run(
            api.read_input_reference({"image_url": "https://example.com/a.png"}, ImagePolicy(), 64, 64)
        )
    assert (info.value.status, info.value.param) == (429, "input_reference")
    assert info.value.headers == {"Retry-After": "5"}

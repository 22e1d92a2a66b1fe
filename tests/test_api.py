"""The HTTP surface's parsing, without a server: bodies -> requests, errors naming the field sent."""

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

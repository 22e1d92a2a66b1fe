"""Every limit of GenerationRequest gives a clear error that names the field."""

import pytest

from models.request import RequestDefaults, RequestError, RequestLimits, build_request

DEFAULTS = RequestDefaults(
    height=64, width=64, num_frames=9, fps=8, num_inference_steps=4, guidance_scale=5.0
)
LIMITS = RequestLimits(size_multiple=16, frame_step=4, max_frames=257, max_steps=200)


def req(**fields):
    return build_request({"prompt": "a cat", **fields}, DEFAULTS, LIMITS)


def test_defaults_fill_missing_fields_and_none_values():
    r = req(height=None, fps=float("nan"))
    assert (r.height, r.width, r.num_frames, r.fps, r.num_inference_steps) == (64, 64, 9, 8, 4)
    assert r.negative_prompt == ""


def test_id_and_seed_are_stable_digests_of_the_content():
    a, b = req(), req()
    assert a.id == b.id and a.seed == b.seed
    c = req(prompt="a dog")
    assert c.id != a.id and c.seed != a.seed
    assert req(seed=7).seed == 7
    assert req(id="row-1").id == "row-1"


def test_numeric_strings_and_integral_floats_are_accepted():
    r = req(height="32", num_frames=5.0)
    assert r.height == 32 and r.num_frames == 5


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   \n"}, "prompt", "empty"),
        ({"prompt": "x" * 4001}, "prompt", "limit is 4000"),
        ({"prompt": 5}, "prompt", "string"),
        ({"prompt": "a\x00b"}, "prompt", "NUL"),
        ({"negative_prompt": "x" * 5000}, "negative_prompt", "limit"),
        ({"height": 0}, "height", "between"),
        ({"height": -16}, "height", "between"),
        ({"width": 100}, "width", "multiple of 16"),
        ({"height": 4096}, "height", "between"),
        ({"width": "wide"}, "width", "integer"),
        ({"height": 32.5}, "height", "integer"),
        ({"num_frames": 0}, "num_frames", "between"),
        ({"num_frames": 8}, "num_frames", "1 + a multiple of 4"),
        ({"num_frames": 100001}, "num_frames", "between"),
        ({"num_inference_steps": 0}, "num_inference_steps", "between"),
        ({"num_inference_steps": 201}, "num_inference_steps", "between"),
        ({"guidance_scale": -1}, "guidance_scale", "between"),
        ({"guidance_scale": 1e9}, "guidance_scale", "between"),
        ({"fps": 0}, "fps", "between"),
        ({"seed": -1}, "seed", "greater than or equal"),
        ({"id": "../etc/passwd"}, "id", "letters, digits"),
        ({"id": "a/b"}, "id", "letters, digits"),
        ({"id": ""}, "id", "letters, digits"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"height": 2048, "width": 2048, "num_frames": 257}, "num_frames", "pixel-frames"),
    ],
)
def test_each_limit_names_its_field(fields, field, words):
    with pytest.raises(RequestError) as info:
        req(**fields)
    assert info.value.field == field
    assert field in str(info.value)
    assert words in str(info.value)


def test_missing_prompt():
    with pytest.raises(RequestError, match="prompt: field required"):
        build_request({"height": 64}, DEFAULTS, LIMITS)


def test_family_limits_come_from_the_checkpoint_configs():
    from models.families import adapter_class
    from models.spec import ModelSpec

    for preset, family, step in (("tiny-wan", "wan", 4), ("tiny-cogvideox", "cogvideox", 8)):
        spec = ModelSpec(weights=preset)
        assert spec.resolved_family == family
        limits = adapter_class(spec).request_limits(spec)
        assert (limits.size_multiple, limits.frame_step) == (16, step)


def test_config_limits_tighten_the_models():
    from models.config import KinorayConfig

    limits = KinorayConfig(limits={"max_size": 128, "max_steps": 10}).request_limits()
    assert (limits.max_size, limits.max_steps, limits.size_multiple) == (128, 10, 16)
    with pytest.raises(RequestError, match="num_inference_steps"):
        build_request({"prompt": "x", "num_inference_steps": 11}, DEFAULTS, limits)

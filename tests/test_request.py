"""Every limit of the request contract gives a clear error naming the field; ids and seeds are
stable digests of what decides the output."""

import pytest

from kinoray.models.config import KinorayConfig
from kinoray.models.request import (
    REQUEST_COLUMNS,
    GenerationRequest,
    RequestBuilder,
    RequestError,
    RequestLimits,
    SamplingParams,
)

DEFAULTS = {
    "negative_prompt": "",
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "fps": 8,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
}
LIMITS = RequestLimits(size_multiple=16, frame_step=4, max_frames=257, max_steps=200)
BUILDER = RequestBuilder(DEFAULTS, LIMITS, model="tiny-wan")


def req(**fields):
    return BUILDER.build({"prompt": "a cat", **fields})


def test_defaults_fill_missing_fields_and_none_values():
    r = req(height=None, fps=float("nan"))
    s = r.sampling
    assert (s.height, s.width, s.num_frames, s.fps, s.num_inference_steps) == (64, 64, 9, 8, 4)
    assert r.negative_prompt == ""


def test_sampling_params_are_a_hashable_grouping_key():
    a, b = req(seed=1), req(seed=2, prompt="a dog")
    assert a.sampling == b.sampling and hash(a.sampling) == hash(b.sampling)
    assert req(height=32).sampling != a.sampling
    assert len({a.sampling, b.sampling, req(height=32).sampling}) == 2


def test_row_round_trip_has_the_flat_columns():
    r = req(seed=3)
    row = r.row()
    assert tuple(row) == REQUEST_COLUMNS
    assert GenerationRequest.from_row(row) == r


def test_id_and_seed_are_stable_digests_of_the_content():
    a, b = req(), req()
    assert a.id == b.id and a.seed == b.seed
    c = req(prompt="a dog")
    assert c.id != a.id and c.seed != a.seed
    assert req(seed=7).seed == 7
    assert req(id="row-1").id == "row-1"


def test_one_prompt_with_two_seeds_is_two_requests():
    assert req(seed=1).id != req(seed=2).id


def test_two_ids_without_seeds_are_two_takes():
    a, b = req(id="take-a"), req(id="take-b")
    assert a.seed != b.seed


def test_the_model_is_part_of_the_derived_id():
    other = RequestBuilder(DEFAULTS, LIMITS, model="tiny-ltx").build({"prompt": "a cat"})
    assert other.id != req().id


def test_numeric_strings_and_integral_floats_are_accepted():
    r = req(height="32", num_frames=5.0)
    assert r.sampling.height == 32 and r.sampling.num_frames == 5


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   \n"}, "prompt", "empty"),
        ({"prompt": "x" * 4001}, "prompt", "limit is 4000"),
        ({"prompt": 5}, "prompt", "string"),
        ({"prompt": "a\x00b"}, "prompt", "NUL"),
        ({"prompt": "a cat \ud83d then text"}, "prompt", "surrogate"),
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
        ({"guidance_scale": float("inf")}, "guidance_scale", "between"),
        ({"fps": 0}, "fps", "between"),
        ({"seed": -1}, "seed", "greater than or equal"),
        ({"seed": 2**64}, "seed", "less than"),
        ({"id": "../etc/passwd"}, "id", "letters, digits"),
        ({"id": "a/b"}, "id", "letters, digits"),
        ({"id": ""}, "id", "letters, digits"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"prompt": "caf\udce9 au lait"}, "prompt", "not valid UTF-8 (is the file in another encoding"),
        ({"prompt": "a cat \ud83d then text"}, "prompt", "a lone surrogate"),
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
        BUILDER.build({"height": 64})


def test_config_limits_tighten_but_never_widen_the_models():
    builder = KinorayConfig(limits={"max_size": 64, "max_steps": 10}).request_builder()
    assert (builder.limits.max_size, builder.limits.max_steps, builder.limits.size_multiple) == (64, 10, 16)
    with pytest.raises(RequestError, match="num_inference_steps"):
        builder.build({"prompt": "x", "num_inference_steps": 11})
    wider = KinorayConfig(limits={"max_size": 100000}).request_builder()
    assert wider.limits.max_size == KinorayConfig().request_builder().limits.max_size


def test_sampling_params_field_list_is_the_one_place_a_parameter_is_declared():
    assert set(SamplingParams.model_fields) <= set(REQUEST_COLUMNS)
    assert REQUEST_COLUMNS[:4] == ("id", "prompt", "negative_prompt", "seed")

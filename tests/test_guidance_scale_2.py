"""Wan 2.2's `guidance_scale_2`, a sampling parameter declared once in the request model, reaches
every front end: CLI flag, table column, API field, manifest column, and the staged pipeline."""

import numpy as np
import pytest

from kinoray.cli import build_parser, main
from kinoray.deployments.api import APIError, VideoCreateBody, parse_create
from kinoray.models.config import KinorayConfig
from kinoray.models.families import adapter_class, load_pipeline
from kinoray.models.local import LocalPipeline
from kinoray.models.request import REQUEST_COLUMNS as COLUMNS
from kinoray.models.request import RequestError
from kinoray.models.spec import ModelSpec
from kinoray.pipelines.manifest import SCHEMA

WAN22 = KinorayConfig(model=ModelSpec(weights="tiny-wan22"))


@pytest.fixture(scope="module")
def local():
    return LocalPipeline(WAN22)


def test_staged_equals_monolithic_with_guidance_scale_2(local):
    req = local.request(prompt="two experts", seed=5, guidance_scale=5.0, guidance_scale_2=1.0)
    assert req.sampling.guidance_scale_2 == 1.0
    got = local.run([req])["frames"][0]
    spec = local.config.model
    ref = adapter_class(spec).generate(spec, load_pipeline(spec), [req])[0]
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # ... and it changes the result: the low-noise expert ran with another scale.
    plain = local.run([local.request(prompt="two experts", seed=5, guidance_scale=5.0)])["frames"][0]
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 8


def test_one_expert_models_refuse_it_naming_the_field():
    with pytest.raises(RequestError) as info:
        KinorayConfig().request_builder().build({"prompt": "x", "guidance_scale_2": 1.0})
    assert info.value.field == "guidance_scale_2" and "not supported by this model" in str(info.value)


def test_cli_flag(tmp_path, capsys):
    assert build_parser().parse_args(["generate", "x", "--guidance-scale-2", "2"]).guidance_scale_2 == 2.0
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", "--model", "tiny-wan22", "--guidance-scale-2", "2", "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_api_field(local):
    assert "guidance_scale_2" in VideoCreateBody.model_fields
    req, _ = parse_create({"prompt": "x", "guidance_scale_2": 2.5}, ["tiny-wan22"], local.builder, "video_1")
    assert req.sampling.guidance_scale_2 == 2.5
    with pytest.raises(APIError) as info:
        parse_create(
            {"prompt": "x", "guidance_scale_2": 2.5}, ["tiny-wan"], KinorayConfig().request_builder(), "v"
        )
    assert info.value.param == "guidance_scale_2"


def test_table_column_and_manifest_column():
    # The bulk job end to end with the column: tests/test_families_e2e.py (tiny-wan22).
    assert "guidance_scale_2" in COLUMNS
    assert str(SCHEMA.field("guidance_scale_2").type) == "double"

"""What a checkpoint accepts is known from its configs before any weights load, and it is right:
the largest request the limits accept generates; one step beyond is refused at validation."""

import numpy as np
import pytest
import yaml

from kinoray.cli import main
from kinoray.models import tiny
from kinoray.models.config import KinorayConfig
from kinoray.models.families import adapter_class
from kinoray.models.local import LocalPipeline
from kinoray.models.request import RequestError, SamplingParams
from kinoray.models.spec import ModelSpec
from kinoray.models.stages import Denoiser, TextEncoder

PRESETS = tiny.preset_names(tested_only=True, image=False)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_largest_accepted_request_generates_and_one_step_beyond_is_refused(preset):
    local = LocalPipeline(KinorayConfig(model=ModelSpec(weights=preset)))
    lim = local.builder.limits
    largest = local.request(
        prompt="as large as allowed",
        height=lim.max_size,
        width=lim.max_size,
        num_frames=lim.max_frames,
        num_inference_steps=2,
    )
    out = local.run([largest])
    assert out["error"][0] == ""
    assert out["frames"][0].shape == (lim.max_frames, lim.max_size, lim.max_size, 3)
    for field, value in (
        ("height", lim.max_size + lim.size_multiple),
        ("width", lim.max_size + lim.size_multiple),
        ("num_frames", lim.max_frames + lim.frame_step),
    ):
        with pytest.raises(RequestError) as info:
            local.request(prompt="one step beyond", **{field: value})
        assert info.value.field == field


@pytest.mark.parametrize("preset, fits, beyond", [("tiny-wan", 512, 528), ("tiny-sd3", 1536, 1552)])
def test_positional_capacity_is_what_the_transformer_holds(preset, fits, beyond):
    """The capacity rule read from the transformer config matches where the transformer breaks."""
    spec = ModelSpec(weights=preset)
    info = spec.info
    adapter = adapter_class(spec)
    capacity = adapter.capacity(spec, info.vae_scale_factor_spatial, info.vae_scale_factor_temporal)
    assert capacity["max_size"] == fits
    batch = TextEncoder(spec)({"prompt": np.array(["x"], object), "negative_prompt": np.array([""], object)})
    denoiser = Denoiser(spec)
    cond = {c: batch[c] for c in denoiser.conditioning_columns()}
    base = {"height": 16, "num_frames": 1, "fps": 1, "num_inference_steps": 1, "guidance_scale": 1.0}
    denoiser.adapter.denoise(cond, [0], SamplingParams.model_construct(width=fits, **base))
    with pytest.raises(Exception):  # noqa: B017  (whatever the transformer raises)
        denoiser.adapter.denoise(cond, [0], SamplingParams.model_construct(width=beyond, **base))


def test_wan_frame_capacity_follows_its_rotary_table():
    spec = ModelSpec(weights="tiny-wan")
    # 32 rotary positions, temporal patch 1, 4 frames per latent frame: 1 + 31 * 4 frames.
    assert adapter_class(spec).capacity(spec, 8, 4)["max_frames"] == 125


@pytest.mark.parametrize(
    "section, body",
    [
        ("model", {"model": {"weigths": "tiny-wan"}}),
        ("defaults", {"defaults": {"num_steps": 4}}),
        ("limits", {"limits": {"max_sise": 64}}),
        ("encoder", {"encoder": {"batchsize": 4}}),
        ("denoiser", {"denoiser": {"gpus": 1}}),
        ("decoder", {"decoder": {"replicas": 2}}),
        ("batch", {"batch": {"metric_port": 9}}),
        ("serve", {"serve": {"api_key": "x"}}),
        ("top level", {"modle": {}}),
    ],
)
def test_every_config_section_refuses_unknown_keys(section, body):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        KinorayConfig.model_validate(body)
    bad_key = next(iter(next(iter(body.values())))) if section != "top level" else "modle"
    assert bad_key in str(info.value)


def test_an_unknown_preset_is_refused_listing_the_presets():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="tiny-wan22"):
        ModelSpec(weights="tiny-foo")


def test_generate_refuses_a_bad_value_before_loading_any_model(monkeypatch, tmp_path, capsys):
    import diffusers

    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(refuse))
    code = main(["generate", "a fox", "--height", "100", "-o", str(tmp_path / "x.mp4")])
    assert code == 2 and loads == []
    assert "height: must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_config_defaults_override_the_checkpoints(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"num_inference_steps": 3, "negative_prompt": "blurry"}}))
    builder = KinorayConfig.load(path).request_builder()
    req = builder.build({"prompt": "x"})
    assert req.sampling.num_inference_steps == 3 and req.negative_prompt == "blurry"
    assert req.sampling.height == 64  # the preset's own default

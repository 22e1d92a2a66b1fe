"""Image-to-video through the three stages: each row's reference image, read in the encode stage,
gives the frames the family's own image-to-video pipeline gives for it."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from kinoray.models import tiny
from kinoray.models.config import KinorayConfig
from kinoray.models.families import adapter_class, load_pipeline
from kinoray.models.local import LocalPipeline
from kinoray.models.request import RequestError
from kinoray.models.spec import ModelSpec
from kinoray.models.stages import Decoder, Denoiser, TextEncoder, requests_to_batch

# Every preset that takes an image; those that also make videos from text alone are in the
# text-to-video matrix too, except the ones made only for this test (tested=False).
PRESETS = tiny.preset_names(image=True)
PROMPTS = [("a red fox in the snow", 11), ("surfing at sunset, wide shot", 2024), ("rain on a window", 7)]
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}


def picture(path, seed, size=(48, 40)):
    """A noise picture of another aspect ratio than the video's: it is resized and cropped."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module", params=PRESETS)
def local(request):
    return LocalPipeline(KinorayConfig(model=ModelSpec(weights=request.param)))


def frames_for(local):
    return local.builder.limits.frame_step + 1


def test_staged_equals_the_image_to_video_pipeline_per_reference_image(local, tmp_path):
    images = [picture(tmp_path / f"{k}.png", k) for k in range(3)]
    reqs = [
        local.request(prompt=p, seed=s, image=img, num_frames=frames_for(local), **SMALL)
        for (p, s), img in zip(PROMPTS, images)
    ]
    # The first row's prompt and seed with the second row's image: only the image differs.
    reqs.append(reqs[0].model_copy(update={"id": "swapped", "image": images[1]}))
    either = local.builder.limits.image_input == "optional"
    if either:  # a model that takes either: text-only rows in the same batch
        reqs += [r.model_copy(update={"id": f"text-{k}", "image": None}) for k, r in enumerate(reqs[:2])]
    calls = len(local.denoiser.batch_sizes)
    out = local.run(reqs)
    assert list(out["error"]) == [""] * len(reqs)
    # Rows with an image and rows without are denoised in calls of their own.
    assert local.denoiser.batch_sizes[calls:] == ([4, 2] if either else [4])
    spec = local.config.model
    pipe, adapter = load_pipeline(spec), adapter_class(spec)
    refs = [adapter.generate(spec, pipe, [r])[0] for r in reqs]
    for i, ref in enumerate(refs):
        got = out["frames"][i]
        assert got.shape == (frames_for(local), 32, 32, 3)
        # diffusers on CPU is not bitwise across batch sizes: allow one level of 255.
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        for j, other in enumerate(refs):
            if j != i:  # each row follows its own image and prompt, not a neighbour's
                assert np.abs(got.astype(int) - other.astype(int)).max() > 1
    digests = [hashlib.sha256(open(img, "rb").read()).hexdigest() for img in images]
    assert list(local.encoder(requests_to_batch(reqs[:3]))["image_sha256"]) == digests


def test_an_unreadable_image_fails_its_row_naming_image_and_spares_the_others(local, tmp_path):
    good = picture(tmp_path / "good.png", 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    reqs = [
        local.request(prompt="a", seed=1, image=good, num_frames=frames_for(local), **SMALL),
        local.request(
            prompt="b", seed=1, image=str(tmp_path / "missing.png"), num_frames=frames_for(local), **SMALL
        ),
        local.request(
            prompt="c", seed=1, image=str(tmp_path / "broken.png"), num_frames=frames_for(local), **SMALL
        ),
    ]
    out = local.run(reqs)
    assert out["error"][0] == ""
    for i in (1, 2):
        assert out["error"][i].startswith("image: ") and out["error_reason"][i] == "invalid_image"
        assert out["error_stage"][i] == "encode"
    assert "missing.png" in out["error"][1]


def test_requests_say_when_a_model_needs_or_refuses_an_image(tmp_path):
    i2v = KinorayConfig(model=ModelSpec(weights="tiny-wan-i2v")).request_builder()
    t2v = KinorayConfig(model=ModelSpec(weights="tiny-wan")).request_builder()
    assert i2v.limits.image_input == "required" and t2v.limits.image_input == "none"
    with pytest.raises(RequestError) as info:
        i2v.build({"prompt": "a fox"})
    assert info.value.field == "image" and "reference image" in str(info.value)
    with pytest.raises(RequestError) as info:
        t2v.build({"prompt": "a fox", "image": "frame.png"})
    assert info.value.field == "image" and "does not take" in str(info.value)
    # The image is part of what the derived id digests: another image, another video.
    a = i2v.build({"prompt": "a fox", "image": "a.png", "seed": 1})
    b = i2v.build({"prompt": "a fox", "image": "b.png", "seed": 1})
    assert a.id != b.id
    # An empty image is a mistake (an unset variable), never a silent text-only video.
    with pytest.raises(RequestError, match="image: is empty"):
        i2v.build({"prompt": "a fox", "image": " "})


def test_the_encode_stage_loads_the_image_components_only_for_image_models():
    spec = ModelSpec(weights="tiny-wan-i2v")
    loaded = {
        cls.__name__: {k for k, v in cls(spec).adapter.pipe.components.items() if v is not None}
        for cls in (TextEncoder, Denoiser, Decoder)
    }
    assert {"image_encoder", "image_processor", "vae"} <= loaded["TextEncoder"]
    assert "transformer" not in loaded["TextEncoder"]
    assert "image_encoder" not in loaded["Denoiser"] and "text_encoder" not in loaded["Denoiser"]


def test_the_trained_model_as_ti2v_starts_its_video_from_the_image(tmp_path):
    """shapes-wan run as Wan 2.2 TI2V: the image's latents are the first latent frame, so the
    first frame reproduces the image as well as the trained VAE does (PSNR in dB)."""
    from helpers import psnr

    from kinoray.models.scenes import sample_scene

    local = LocalPipeline(KinorayConfig(model=ModelSpec(weights="shapes-wan-ti2v")))
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(2)]
    firsts = [scene.render()[0] for scene in scenes]
    paths = [tmp_path / f"{k}.png" for k in range(2)]
    for first, path in zip(firsts, paths):
        Image.fromarray(first).save(path)
    reqs = [
        local.request(prompt=s.caption(), seed=k, image=str(p)) for k, (s, p) in enumerate(zip(scenes, paths))
    ]
    out = local.run(reqs)
    assert list(out["error"]) == ["", ""]
    for k in range(2):
        frame0 = out["frames"][k][0]
        assert psnr(frame0, firsts[k]) > 23  # measured 27.3 and 28.7
        assert psnr(frame0, firsts[1 - k]) < psnr(frame0, firsts[k]) - 5


def test_hunyuan_i2v_of_the_33_channel_kind_is_refused_when_the_model_loads(tmp_path):
    import json
    import shutil

    from kinoray.models.spec import ModelError

    folder = tmp_path / "hunyuan-33ch"
    shutil.copytree(tiny.ensure("tiny-hunyuan-i2v"), folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["image_condition_type"] = "latent_concat"
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="latent_concat"):
        KinorayConfig(model=ModelSpec(weights=str(folder))).request_builder()

"""The three stages, run one after another, give the monolithic diffusers pipeline's frames."""

import numpy as np
import pytest

from kinoray.models import tiny
from kinoray.models.config import KinorayConfig
from kinoray.models.families import adapter_class, load_pipeline
from kinoray.models.local import LocalPipeline
from kinoray.models.spec import ModelSpec
from kinoray.models.stages import Decoder, Denoiser, TextEncoder, requests_to_batch

PROMPTS = [("a red fox in the snow", 11), ("surfing at sunset, wide shot", 2024), ("rain on a window", 7)]
PRESETS = tiny.preset_names(tested_only=True, image=False)


@pytest.fixture(scope="module", params=PRESETS)
def local(request):
    return LocalPipeline(KinorayConfig(model=ModelSpec(weights=request.param)))


def reference(local, reqs):
    """The family's own pipeline, called once per request as its model card shows."""
    spec = local.config.model
    pipe = load_pipeline(spec)
    adapter = adapter_class(spec)
    return [adapter.generate(spec, pipe, [r])[0] for r in reqs]


def test_staged_equals_monolithic_for_a_batch_of_three(local):
    reqs = [local.request(prompt=p, seed=s) for p, s in PROMPTS]
    out = local.run(reqs)
    assert list(out["error"]) == ["", "", ""]
    refs = reference(local, reqs)
    for i, ref in enumerate(refs):
        got = out["frames"][i]
        s = reqs[i].sampling
        assert got.shape == (s.num_frames, s.height, s.width, 3)
        assert got.dtype == np.uint8
        # diffusers on CPU is not bitwise across batch sizes: allow one level of 255.
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        # ... and each row matches its own prompt's reference, not a neighbour's.
        for j, other in enumerate(refs):
            if j != i:
                assert np.abs(got.astype(int) - other.astype(int)).max() > 8


def test_denoiser_batch_of_four_equals_four_batches_of_one(local):
    reqs = [local.request(prompt=f"prompt number {i}", seed=100 + i) for i in range(4)]
    embedded = local.encoder(requests_to_batch(reqs))
    denoiser = local.denoiser
    denoiser.max_batch_size = None
    before = len(denoiser.batch_sizes)
    together = denoiser(embedded)["latents"]
    assert denoiser.batch_sizes[before:] == [4]
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in embedded.items()}
        alone = denoiser(one)["latents"][0]
        # float32 matmuls of other batch sizes round differently: equal to ~1e-6 of the scale.
        np.testing.assert_allclose(together[i], alone, rtol=1e-4, atol=1e-4)
    assert denoiser.batch_sizes[before + 1 :] == [1, 1, 1, 1]


def test_denoiser_groups_rows_by_sampling(local):
    t = local.builder.defaults["num_frames"]
    long = t if t == 1 else t * 2 - 1
    reqs = [
        local.request(prompt="a", seed=1),
        local.request(prompt="b", seed=2, height=32, width=64, num_frames=long),
        local.request(prompt="c", seed=3),
    ]
    out = local.run(reqs)
    assert [f.shape for f in out["frames"]] == [(t, 64, 64, 3), (long, 32, 64, 3), (t, 64, 64, 3)]
    # Same request alone gives the same frames as inside a mixed batch.
    alone = local.run([reqs[1]])["frames"][0]
    assert np.abs(alone.astype(int) - out["frames"][1].astype(int)).max() <= 1


def test_text_encoder_caches_repeated_texts(local):
    enc: TextEncoder = local.encoder
    reqs = [local.request(prompt="the same prompt", seed=s) for s in range(3)]
    hits = enc.cache_hits
    out = enc(requests_to_batch(reqs))
    # 6 texts (3 prompts + 3 negatives), 2 distinct: 4 come from the cache at least.
    assert enc.cache_hits - hits >= 4
    assert out["prompt_embeds"].shape[0] == 3
    np.testing.assert_array_equal(out["prompt_embeds"][0], out["prompt_embeds"][2])


def test_failed_rows_pass_through_every_stage(local):
    reqs = [local.request(prompt="fine", seed=1), local.request(prompt="marked bad", seed=2)]
    batch = requests_to_batch(reqs)
    batch["error"] = np.array(["", "validation: bad"], dtype=object)
    out = local.decoder(local.denoiser(local.encoder(batch)))
    assert list(out["error"]) == ["", "validation: bad"]
    assert out["frames"][0].shape[0] == local.builder.defaults["num_frames"] and out["frames"][1].size == 0


def test_stages_load_only_their_own_components():
    spec = ModelSpec(weights="tiny-wan")
    loaded = {
        cls.__name__: {k for k, v in cls(spec).adapter.pipe.components.items() if v is not None}
        for cls in (TextEncoder, Denoiser, Decoder)
    }
    assert loaded == {
        "TextEncoder": {"tokenizer", "text_encoder"},
        "Denoiser": {"transformer", "scheduler"},
        "Decoder": {"vae"},
    }
    # Wan 2.2's two experts both live in the denoise stage.
    denoiser = Denoiser(ModelSpec(weights="tiny-wan22")).adapter.pipe
    assert denoiser.transformer is not None and denoiser.transformer_2 is not None
    assert denoiser.config.boundary_ratio == 0.875


CACHES = [
    (preset, cache) for preset in PRESETS for cache in sorted(adapter_class(ModelSpec(weights=preset)).caches)
]


@pytest.mark.parametrize("preset, cache", CACHES)
def test_step_caching_runs_and_is_enabled(preset, cache):
    spec = ModelSpec(weights=preset, cache=cache, cache_threshold=0.5)
    local = LocalPipeline(KinorayConfig(model=spec))
    assert local.denoiser.adapter.pipe.transformer.is_cache_enabled
    out = local.run([local.request(prompt="cached", seed=1, num_inference_steps=8)])
    assert out["error"][0] == ""
    assert out["frames"][0].shape == (local.builder.defaults["num_frames"], 64, 64, 3)


def test_a_cache_is_refused_where_the_family_cannot_use_it():
    with pytest.raises(ValueError, match="not supported by the wan family; supported: first_block"):
        Denoiser(ModelSpec(weights="tiny-wan", cache="faster"))
    with pytest.raises(ValueError, match="not supported by the sd3 family; supported: none"):
        Denoiser(ModelSpec(weights="tiny-sd3", cache="first_block"))


def test_compile_wraps_the_denoiser_transformer():
    pipe = Denoiser(ModelSpec(weights="tiny-wan22", compile=True)).adapter.pipe
    # nn.Module.compile() swaps in a compiled forward; running it would only cost compile time here.
    assert pipe.transformer._compiled_call_impl is not None
    assert pipe.transformer_2._compiled_call_impl is not None


def test_a_cancelled_row_leaves_its_batch_and_its_batch_mates_are_undisturbed(local):
    reqs = [local.request(prompt=f"row number {i}", seed=300 + i) for i in range(3)]
    embedded = local.encoder(requests_to_batch(reqs))
    ids = [str(i) for i in embedded["id"]]
    denoiser = local.denoiser
    denoiser.max_batch_size = None
    undisturbed = denoiser(embedded)["latents"]
    rows_per_step: list[int] = []

    def on_step(live, done, total):
        rows_per_step.append(len(live))

    # Row 1 is cancelled after the second step.
    out = denoiser(
        embedded, on_step=on_step, cancelled=lambda: {ids[1]} if len(rows_per_step) >= 2 else set()
    )
    assert list(out["error_reason"]) == ["", "cancelled", ""]
    for i in (0, 2):
        np.testing.assert_allclose(out["latents"][i], undisturbed[i], rtol=1e-4, atol=1e-4)
    steps = reqs[0].sampling.num_inference_steps
    assert len(rows_per_step) == steps
    if denoiser.adapter.drops_rows:  # it left the batch at the next step
        assert rows_per_step == [3, 3] + [2] * (steps - 2)
    else:  # computed with its batch to the end, then discarded
        assert rows_per_step == [3] * steps

    # A batch whose rows are all cancelled stops at once, whatever the family.
    rows_per_step.clear()
    out = denoiser(embedded, on_step=on_step, cancelled=lambda: set(ids))
    assert list(out["error_reason"]) == ["cancelled"] * 3
    assert rows_per_step == [3]

"""LoRA adapters through the three stages, in process: a request names adapters of the config's
catalog; each row equals the family's own diffusers pipeline with the same adapters loaded at
the same scales; the denoiser makes one call per adapter set and keeps an LRU of adapters."""

import json

import numpy as np
import pytest

from kinoray.models import tiny
from kinoray.models.config import ConfigError, KinorayConfig
from kinoray.models.families import adapter_class, load_pipeline
from kinoray.models.local import LocalPipeline
from kinoray.models.loras import lora_location, tiny_lora
from kinoray.models.request import RequestError, lora_key
from kinoray.models.spec import ModelSpec

# Every text-to-video and text-to-image family (diffusers' LoRA loader supports each of them).
PRESETS = tiny.preset_names(tested_only=True, image=False)
# `inked` also adapts the text encoders where the family's LoRA loader does (FLUX.1, SD3).
CATALOG = {"pastel": "tiny-lora-1", "neon": "tiny-lora-2", "inked": "tiny-lora-te-3"}
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}


def config(weights, **changes):
    return KinorayConfig.model_validate({"model": {"weights": weights}, "loras": CATALOG, **changes})


def frames_for(local):
    limits = local.builder.limits
    return 1 if limits.max_frames == 1 else limits.frame_step + 1


@pytest.fixture(scope="module", params=PRESETS)
def local(request):
    return LocalPipeline(config(request.param))


def test_each_row_equals_the_pipeline_with_its_adapters_loaded_at_its_scales(local):
    n = frames_for(local)
    adapters = [
        None,
        "pastel",
        "neon",
        "pastel:0.5",
        [{"name": "pastel", "scale": 0.7}, {"name": "neon"}],
        "inked:0.8",
    ]
    reqs = [
        local.request(prompt="a red fox in the snow", seed=5, lora=a, num_frames=n, **SMALL) for a in adapters
    ]
    reqs.append(local.request(prompt="rain on a window", seed=9, lora="neon", num_frames=n, **SMALL))
    calls = len(local.denoiser.batch_sizes)
    out = local.run(reqs)
    assert list(out["error"]) == [""] * len(reqs)
    # One denoiser call per adapter set and scales: the two "neon" rows share one.
    assert sorted(local.denoiser.batch_sizes[calls:]) == [1, 1, 1, 1, 1, 2]
    if local.encoder.adapter.text_encoder_loras:  # the text encoder is adapted, in the encode stage
        base, inked = local.encoder.embed(["a fox"])[0], local.encoder.embed(["a fox"], reqs[5].lora)[0]
        assert any(not np.allclose(base[k], inked[k]) for k in base)

    spec = local.config.model
    pipe, family = load_pipeline(spec), adapter_class(spec)
    for name, source in local.config.loras.items():
        where, kwargs = lora_location(source, spec)
        pipe.load_lora_weights(where, adapter_name=name, **kwargs)
    refs = []
    for req in reqs:
        if req.lora:
            pipe.enable_lora()
            pipe.set_adapters([r.name for r in req.lora], adapter_weights=[r.scale for r in req.lora])
        else:
            pipe.disable_lora()
        refs.append(family.generate(spec, pipe, [req])[0])
    for i, ref in enumerate(refs):
        got = out["frames"][i]
        # diffusers on CPU is not bitwise across batch sizes: allow one level of 255.
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, (i, reqs[i].lora)
    # The adapter is what makes the first five rows differ (same prompt and seed).
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(out["frames"][i].astype(int) - out["frames"][j].astype(int)).max() > 1, (i, j)


def test_the_adapters_are_part_of_the_row_identity_and_row():
    builder = config("tiny-wan").request_builder()
    plain = builder.build({"prompt": "a fox", "seed": 1})
    styled = builder.build({"prompt": "a fox", "seed": 1, "lora": "pastel"})
    weaker = builder.build({"prompt": "a fox", "seed": 1, "lora": "pastel:0.5"})
    assert len({plain.id, styled.id, weaker.id}) == 3
    # Requests without adapters keep the id they had before adapters existed.
    assert plain.id == KinorayConfig().request_builder().build({"prompt": "a fox", "seed": 1}).id
    # Every accepted spelling of the same adapters is the same request.
    spellings = [
        [{"name": "neon", "scale": 1}, {"name": "pastel", "scale": 0.5}],
        '[{"name": "pastel", "scale": 0.5}, {"name": "neon"}]',
        "pastel:0.5, neon",
        [{"name": "pastel", "scale": "0.5"}, "neon"],
    ]
    ids = {builder.build({"prompt": "a fox", "seed": 1, "lora": s}).id for s in spellings}
    assert len(ids) == 1
    row = builder.build({"prompt": "a fox", "seed": 1, "lora": spellings[0]}).row()
    assert json.loads(row["lora"]) == [{"name": "neon", "scale": 1.0}, {"name": "pastel", "scale": 0.5}]
    assert plain.row()["lora"] is None
    assert lora_key(styled.lora) == "pastel"


@pytest.mark.parametrize(
    "value, words",
    [
        ("cyberpunk", "unknown adapter 'cyberpunk'; this deployment serves: inked, neon, pastel"),
        ("/etc/loras/x.safetensors", "looks like a path"),
        ("../pastel", "looks like a path"),
        ("org/some-lora", "looks like a path"),
        ("hf://org/x", "looks like a path"),
        ([{"name": "pastel", "scale": "strong"}], "scale"),
        ([{"name": "pastel", "scale": float("inf")}], "between -10 and 10"),
        ([{"name": "pastel", "scale": 10**400}], "between -10 and 10"),
        ("pastel:nan", "'nan' is not a number"),
        ("pastel:inf", "'inf' is not a number"),
        ("pastel:1e400", "between -10 and 10"),
        ("pastel:1_0", "'1_0' is not a number"),
        ("pastel:1e30", "between -10 and 10"),
        ([{"name": f"n{i}"} for i in range(100_000)], "more than 64 adapters"),
        (",".join(["pastel"] * 20_000), "more than 64 adapters"),
        ("x" * 100_000, "is not an adapter name"),
        ([{"name": "pastel", "weight": 1}], "weight"),
        ("pastel,pastel:0.5", "named twice"),
        ("[{broken", "not valid JSON"),
        (42, "must be a list"),
    ],
)
def test_a_bad_adapter_is_refused_naming_lora(value, words):
    builder = config("tiny-wan").request_builder()
    with pytest.raises(RequestError) as err:
        builder.build({"prompt": "a fox", "lora": value})
    assert err.value.field == "lora" and words in str(err.value), str(err.value)
    assert len(str(err.value)) < 400  # a name of any length is cut short in the message


@pytest.mark.parametrize(
    "value, adapters",
    [
        # What pandas writes for a struct field left out, or NaN: the default scale.
        ([{"name": "neon", "scale": None}, {"name": "pastel", "scale": float("nan")}], "neon:1,pastel:1"),
        # Repeated CLI flags and form fields, each in any form.
        (["pastel:0.5,neon"], "neon:1,pastel:0.5"),
        (['[{"name": "pastel", "scale": 0.5}, {"name": "neon"}]'], "neon:1,pastel:0.5"),
        (["pastel:0.5", "neon"], "neon:1,pastel:0.5"),
        # No adapter: an empty or null cell, an adapter at scale 0.
        ("", ""),
        ("null", ""),
        ([], ""),
        ("pastel:0", ""),
        ("pastel:-2.5e-1", "pastel:-0.25"),
    ],
)
def test_every_spelling_of_adapters_means_what_it_says(value, adapters):
    req = config("tiny-wan").request_builder().build({"prompt": "a fox", "lora": value})
    assert ",".join(f"{r.name}:{r.scale:g}" for r in req.lora) == adapters


def test_other_weights_behind_a_name_are_another_request():
    # A rerun after the catalog points a name at other weights makes the video again.
    first = config("tiny-wan").request_builder().build({"prompt": "a fox", "seed": 1, "lora": "pastel"})
    moved = config("tiny-wan", loras={**CATALOG, "pastel": "tiny-lora-7"}).request_builder()
    assert moved.build({"prompt": "a fox", "seed": 1, "lora": "pastel"}).id != first.id


def test_a_deployment_without_a_catalog_says_so():
    with pytest.raises(RequestError, match="serves no LoRA adapters"):
        KinorayConfig().request_builder().build({"prompt": "a fox", "lora": "pastel"})


def test_a_request_combines_no_more_adapters_than_a_replica_holds():
    builder = config("tiny-wan", denoiser={"max_loras": 1}).request_builder()
    with pytest.raises(RequestError, match="at most 1"):
        builder.build({"prompt": "a fox", "lora": "pastel,neon"})


def test_the_lru_loads_each_adapter_once_and_evicts_the_least_recently_used():
    local = LocalPipeline(config("tiny-wan", denoiser={"max_loras": 1}))
    loras = local.denoiser.loras
    order = ["pastel", "pastel", "neon", "pastel", None]
    for k, name in enumerate(order):
        out = local.run([local.request(prompt="a fox", seed=k, lora=name, num_frames=5, **SMALL)])
        assert out["error"][0] == ""
    stats = loras.stats()
    assert stats["loads"] == {"pastel": 2, "neon": 1}
    assert stats["hits"] == {"pastel": 1}
    assert stats["evictions"] == {"pastel": 1, "neon": 1}
    assert stats["held"] == ["pastel"]
    # Evicted adapters are gone from the transformer, not only from the bookkeeping.
    assert local.denoiser.adapter.pipe.get_list_adapters() == {"transformer": ["pastel"]}


def test_an_adapter_that_cannot_load_fails_its_rows_and_spares_the_others(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file" * 10)
    local = LocalPipeline(config("tiny-wan", loras={**CATALOG, "broken": str(broken)}))
    reqs = [
        local.request(prompt="a fox", seed=1, lora=name, num_frames=5, **SMALL)
        for name in ("broken", "pastel", None, "broken")
    ]
    out = local.run(reqs)
    assert [bool(e) for e in out["error"]] == [True, False, False, True]
    assert out["error_reason"][0] == "lora_unavailable"
    assert out["error"][0].startswith("lora: cannot load adapter 'broken': ")
    assert "\n" not in out["error"][0] and len(out["error"][0]) < 400
    # The transformer holds no trace of the failed adapter.
    assert local.denoiser.adapter.pipe.get_list_adapters() == {"transformer": ["pastel"]}


def test_catalog_mistakes_are_config_errors_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for loras, words in [
        ({"a/b": "x"}, "'a/b': an adapter name"),
        ({"style": "./missing-folder"}, "loras.style.weights: no such file or folder"),
        ({"style": {"weight": "x"}}, "loras.style.weights"),
        ({"style": str(tmp_path / "empty")}, "holds no .safetensors file"),
        ({"style": str(tmp_path / "notes.txt")}, "is not a .safetensors file"),
        ({"style": "tiny-lora-abc"}, "tiny-lora-<seed>"),
        ({"style": "https://huggingface.co/org/x"}, "not a local folder or .safetensors file, a hub id"),
        ({"style": "s3://bucket/x.safetensors"}, "not a local folder or .safetensors file, a hub id"),
    ]:
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"loras": loras}))
        with pytest.raises(ConfigError, match="config file") as err:
            KinorayConfig.load(path)
        assert words in str(err.value), str(err.value)


def test_weights_2_on_a_model_with_one_transformer_is_a_config_error():
    with pytest.raises(ConfigError, match="loras.pastel.weights_2: tiny-wan has one transformer"):
        config(
            "tiny-wan", loras={"pastel": {"weights": "tiny-lora-1", "weights_2": "tiny-lora-2"}}
        ).request_builder()


def test_a_catalog_adapter_may_be_a_file_a_folder_or_a_tiny_one(tmp_path):
    spec = ModelSpec(weights="tiny-wan")
    folder = tiny_lora(spec, 3)
    single = tmp_path / "style.safetensors"
    single.write_bytes((folder / "pytorch_lora_weights.safetensors").read_bytes())
    local = LocalPipeline(config("tiny-wan", loras={"a": str(folder), "b": str(single), "c": "tiny-lora-3"}))
    out = local.run(
        [local.request(prompt="a fox", seed=1, lora=name, num_frames=5, **SMALL) for name in ("a", "b", "c")]
    )
    assert list(out["error"]) == ["", "", ""]
    # The same weights, however the catalog names them.
    assert np.array_equal(out["frames"][0], out["frames"][1])
    assert np.array_equal(out["frames"][0], out["frames"][2])


@pytest.mark.slow
def test_a_compiled_transformer_swaps_adapters_in_place_without_recompiling():
    import torch._dynamo

    compiled = LocalPipeline(
        config("tiny-wan", model={"weights": "tiny-wan", "compile": True}, denoiser={"max_loras": 2})
    )
    eager = LocalPipeline(config("tiny-wan"))
    graphs = torch._dynamo.utils.counters["stats"]

    def run(local, lora):
        out = local.run([local.request(prompt="a fox", seed=3, lora=lora, num_frames=5, **SMALL)])
        assert out["error"][0] == ""
        return out["frames"][0].astype(int)

    # Two slots fill (pastel, neon) and the scale becomes a graph input: the warm-up.
    warmup = ["pastel", "neon", None, "pastel:0.5"]
    # Then inked replaces neon in its slot, neon replaces pastel, and scales change.
    swaps = ["inked:0.8", "neon", None, "inked:0.3", "pastel"]
    for lora in warmup:
        assert np.abs(run(compiled, lora) - run(eager, lora)).max() <= 1, lora
    before = graphs["unique_graphs"]
    for lora in swaps:
        assert np.abs(run(compiled, lora) - run(eager, lora)).max() <= 1, lora
    assert graphs["unique_graphs"] == before  # no recompilation
    stats = compiled.denoiser.loras.stats()
    assert stats["loads"] == {"pastel": 2, "neon": 2, "inked": 1}
    assert sorted(stats["slots"].values()) == ["slot0", "slot1"]


def test_a_hub_adapter_out_of_reach_fails_its_rows_at_once_saying_why(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as conftest sets it: no network here
    local = LocalPipeline(config("tiny-wan", loras={**CATALOG, "remote": "someone/some-lora"}))
    start = time.perf_counter()
    out = local.run(
        [local.request(prompt="a fox", seed=1, lora=name, num_frames=5, **SMALL) for name in ("remote", None)]
    )
    assert time.perf_counter() - start < 30  # no retry storm
    assert out["error_reason"][0] == "lora_unavailable" and out["error"][1] == ""
    assert "someone/some-lora" in out["error"][0] and "not in the local cache" in out["error"][0], out[
        "error"
    ][0]


def test_a_two_expert_adapter_loads_each_experts_weights_as_diffusers_does():
    # Wan 2.2 A14B's adapters come as two files: the high-noise expert's and the low-noise one's.
    two = {"weights": "tiny-lora-1", "weights_2": "tiny-lora-2"}
    local = LocalPipeline(config("tiny-wan22", loras={"two": two, "high": "tiny-lora-1"}))
    reqs = [
        local.request(prompt="a fox", seed=4, lora=name, num_frames=5, **SMALL) for name in ("two", "high")
    ]
    out = local.run(reqs)
    assert list(out["error"]) == ["", ""]
    spec = local.config.model
    pipe, family = load_pipeline(spec), adapter_class(spec)
    source = local.config.loras["two"]
    where, kwargs = lora_location(source, spec)
    pipe.load_lora_weights(where, adapter_name="two", **kwargs)
    where, kwargs = lora_location(source, spec, second=True)
    pipe.load_lora_weights(where, adapter_name="two", load_into_transformer_2=True, **kwargs)
    pipe.set_adapters(["two"], adapter_weights=[1.0])
    ref = family.generate(spec, pipe, [reqs[0]])[0]
    assert np.abs(out["frames"][0].astype(int) - ref.astype(int)).max() <= 1
    # The low-noise expert's adapter is part of the video: without it, another one.
    assert np.abs(out["frames"][0].astype(int) - out["frames"][1].astype(int)).max() > 1

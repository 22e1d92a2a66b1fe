"""Tiny presets are deterministic and load through the real from_pretrained path."""

import hashlib

import pytest

from kinoray.models import tiny


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-cogvideox"])
def test_building_twice_gives_identical_files(tmp_path, preset):
    a = tiny.build(preset, tmp_path / "a")
    b = tiny.build(preset, tmp_path / "b")
    da, db = digests(a), digests(b)
    assert da == db
    assert {
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
    } <= set(da)

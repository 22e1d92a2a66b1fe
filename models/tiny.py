"""Tiny models of real architectures, built offline and deterministically.

Each preset is a complete diffusers pipeline folder (model_index.json, safetensors, a tokenizer)
written with `save_pretrained` and loaded back through the same `from_pretrained` path that real
weights use. Weights are random from a fixed seed: the frames are not pictures, but every code
path (tokenizer, text encoder, transformer, scheduler, VAE) is the real one.

Family modules register their presets with `@preset(...)`; this module holds the registry, the
builders' shared parts and the build cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# A checkpoint's own request defaults and limits, written beside the weights: what a model
# card would say ("made for up to 128x128, 33 frames").
DEFAULTS_FILE = "kinoray.json"
# Bumped whenever a preset changes, so a cached build of an older preset is never reused.
BUILDER_VERSION = 4
DEFAULT_MODEL = "shapes-wan"


@dataclass(frozen=True)
class Preset:
    """A named model that kinoray builds itself (`build()` returns a diffusers pipeline) or ships
    trained (`folder` holds its checkpoint).

    `tested` presets are in the test matrix; heavier ones (for benchmarks) are not.
    """

    name: str
    build: Callable[[], Any] | None
    defaults: dict[str, Any]
    limits: dict[str, Any] = field(default_factory=dict)
    tested: bool = True
    folder: Path | None = None
    # Reference images: "none" (text-to-video), "optional" (either) or "required" (image-to-video).
    image: Literal["none", "optional", "required"] = "none"
    # A variant of a shipped checkpoint: its folder with these model_index.json entries changed.
    model_index: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {}


def preset(
    name: str,
    defaults: dict[str, Any],
    limits: dict[str, Any] | None = None,
    tested: bool = True,
    image: Literal["none", "optional", "required"] = "none",
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register the decorated pipeline builder as preset `name`."""

    def register(build: Callable[[], Any]) -> Callable[[], Any]:
        PRESETS[name] = Preset(name, build, defaults, limits or {}, tested, image=image)
        return build

    return register


def shipped(name: str, folder: Path, image: Literal["none", "optional", "required"] = "none") -> None:
    """Register the trained checkpoint in `folder` as preset `name`; its request defaults and
    limits are the ones written beside its weights (`kinoray.json`)."""
    declared = json.loads((folder / DEFAULTS_FILE).read_text())
    PRESETS[name] = Preset(name, None, declared["defaults"], declared.get("limits", {}), True, folder, image)


def variant(name: str, of: str, image: Literal["none", "optional", "required"], **model_index: Any) -> None:
    """Register preset `name`: shipped preset `of` with `model_index` entries changed (e.g. a
    pipeline flag), the same weights."""
    source = PRESETS[of]
    # Tested where named: its weights are the source's, already in the test matrix.
    PRESETS[name] = Preset(
        name, None, source.defaults, source.limits, False, source.folder, image, model_index=model_index
    )


def _variant_folder(preset: Preset) -> Path:
    # Named by what it is made of, so a change of the source's weights is never served stale.
    assert preset.folder is not None
    sums = preset.folder / "SHA256SUMS"
    digest = hashlib.sha256(json.dumps(preset.model_index, sort_keys=True).encode() + sums.read_bytes())
    dest = cache_dir() / f"{preset.name}-{digest.hexdigest()[:12]}"
    if (dest / "model_index.json").exists():
        return dest
    source = preset.folder

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        index = json.loads((tmp / "model_index.json").read_text())
        (tmp / "model_index.json").write_text(json.dumps({**index, **preset.model_index}, indent=2))

    return write_folder(dest, write)


def write_folder(dest: Path, write: Callable[[Path], None], marker: str = "model_index.json") -> Path:
    """`dest`, filled by `write` in a temporary folder beside it and renamed into place:
    concurrent builders never see half a model (or adapter: `marker` is the file that shows a
    complete one), and the first to finish wins."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _registry() -> dict[str, Preset]:
    import kinoray.models.families  # noqa: F401  (family modules register their presets)

    return PRESETS


def is_preset(name: str) -> bool:
    return name in _registry()


def preset_defaults(name: str) -> dict[str, Any]:
    """A preset's request defaults, without building it."""
    return dict(_registry()[name].defaults)


def preset_names(tested_only: bool = False, image: bool | None = None) -> list[str]:
    """Preset names; `image` True: those that take a reference image, False: those that make
    videos from text alone (a model that takes either is in both)."""
    excluded = {True: "none", False: "required", None: None}[image]
    return sorted(n for n, p in _registry().items() if (p.tested or not tested_only) and p.image != excluded)


def cache_dir() -> Path:
    return Path(os.environ.get("KINORAY_CACHE", Path.home() / ".cache" / "kinoray")) / "models"


def build(name: str, dest: Path) -> Path:
    """Build preset `name` into `dest` (atomically: concurrent builders never see half a model)."""
    spec = _registry()[name]
    assert spec.build is not None, f"{name} is shipped, not built"
    pipe = spec.build()

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        declared = {"defaults": spec.defaults, "limits": spec.limits}
        (tmp / DEFAULTS_FILE).write_text(json.dumps(declared, indent=2))

    return write_folder(dest, write)


def ensure(name: str) -> Path:
    """The local folder of preset `name`: the shipped checkpoint, or a build made on first use."""
    preset = _registry()[name]
    if preset.model_index:
        return _variant_folder(preset)
    if preset.folder is not None:
        return preset.folder
    dest = cache_dir() / f"{name}-v{BUILDER_VERSION}"
    if not (dest / "model_index.json").exists():
        build(name, dest)
    return dest


# -- parts the family builders share -----------------------------------------------------------

VIDEO_DEFAULTS = {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4}
IMAGE_DEFAULTS = {"height": 64, "width": 64, "num_frames": 1, "fps": 1, "num_inference_steps": 4}
# Tiny presets exist to be fast: they declare small bounds, as a model card states its resolution.
VIDEO_LIMITS = {"max_size": 128, "max_frames": 33}
IMAGE_LIMITS = {"max_size": 256}


def byte_tokenizer(max_length: int) -> Any:
    """A byte-level tokenizer made on the spot: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def t5_config(cls_name: str, d_model: int, layers: int) -> Any:
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "umt5" else transformers.T5Config
    return config_cls(
        vocab_size=3 + 256,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def clip_config(hidden: int) -> Any:
    from transformers import CLIPTextConfig

    # Token ids follow the byte tokenizer: pad 0, eos 1 (CLIP pools at the eos position).
    return CLIPTextConfig(
        vocab_size=3 + 256,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        hidden_act="gelu",
    )


def image_vae() -> Any:
    """A 2D VAE with FLUX's / SD3's latent shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )

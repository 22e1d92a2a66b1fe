"""Which model to run, and how: weights, family, dtype, device and memory options."""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models import tiny

DType = Literal["auto", "float32", "bfloat16", "float16"]

# model_index.json `_class_name` -> kinoray family name
PIPELINE_FAMILIES = {
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
    "LTXPipeline": "ltx",
    "HunyuanVideoPipeline": "hunyuan",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}


class ModelSpec(BaseModel):
    """A model: a tiny preset name, a local diffusers folder, or a Hugging Face hub id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(default=tiny.DEFAULT_MODEL, description="preset name, local path or hub id")
    family: Literal["auto", "wan", "cogvideox", "ltx", "hunyuan", "flux", "sd3"] = "auto"
    revision: str | None = None
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field(default="auto", description="auto: cuda when available, else cpu")
    max_sequence_length: int | None = Field(default=None, ge=1, description="text tokens; family default")
    vae_tiling: bool = Field(default=False, description="decode in tiles: lower peak memory for large clips")
    vae_slicing: bool = Field(default=False, description="decode a batch one sample at a time")
    cpu_offload: bool = Field(default=False, description="keep weights on the CPU until a model runs (CUDA)")
    compile: bool = Field(default=False, description="torch.compile the denoiser's transformer(s)")
    cache: Literal["none", "first_block", "faster"] = Field(
        default="none",
        description="diffusers' step caching in the denoiser: First Block Cache or FasterCache",
    )
    cache_threshold: float = Field(default=0.05, gt=0, description="First Block Cache's residual threshold")

    @cached_property
    def path(self) -> str:
        """A local folder for presets and local weights; the hub id otherwise."""
        if tiny.is_preset(self.weights):
            return str(tiny.ensure(self.weights))
        return (
            os.path.expanduser(self.weights)
            if os.path.isdir(os.path.expanduser(self.weights))
            else self.weights
        )

    def read_config(self, name: str, subfolder: str | None = None) -> dict[str, Any]:
        """A JSON config file of the checkpoint, without loading any weights."""
        path = self.path
        if os.path.isdir(path):
            full = os.path.join(path, subfolder or "", name)
            with open(full) as f:
                return json.load(f)
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(path, name, subfolder=subfolder, revision=self.revision)
        with open(local) as f:
            return json.load(f)

    @cached_property
    def model_index(self) -> dict[str, Any]:
        return self.read_config("model_index.json")

    @cached_property
    def resolved_family(self) -> str:
        if self.family != "auto":
            return self.family
        cls = self.model_index.get("_class_name", "")
        if cls not in PIPELINE_FAMILIES:
            raise ValueError(
                f"{self.weights}: pipeline class {cls!r} is not supported; "
                f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
            )
        return PIPELINE_FAMILIES[cls]

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> Any:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

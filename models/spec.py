"""Which model to run, and how: weights, family, dtype, device and memory options."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kinoray.models import tiny
from kinoray.models.request import RequestLimits

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint accepts, read from its config files alone (no weights are loaded).

    `defaults` holds a value for every field a request may leave out; `limits` what requests
    may ask for; the VAE factors are pixels per latent cell in space and frames per latent
    frame in time.
    """

    family: str
    pipeline_class: str
    defaults: Mapping[str, Any]
    limits: RequestLimits
    vae_scale_factor_spatial: int
    vae_scale_factor_temporal: int
    is_image_model: bool


class ModelSpec(BaseModel):
    """A model: a preset name, a local diffusers folder, or a Hugging Face hub id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str = Field(default=tiny.DEFAULT_MODEL, description="preset name, local path or hub id")
    family: str = Field(default="auto", description="auto: from model_index.json's pipeline class")
    revision: str | None = None
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field(default="auto", description="auto: cuda when available, else cpu")
    max_sequence_length: int | None = Field(default=None, ge=1, description="text tokens; family default")
    cpu_offload: bool = Field(default=False, description="keep weights on the CPU until a model runs (CUDA)")
    compile: bool = Field(default=False, description="torch.compile the denoiser's transformer(s)")
    cache: Literal["none", "first_block", "faster"] = Field(
        default="none",
        description="diffusers' step caching in the denoiser: First Block Cache or FasterCache",
    )
    cache_threshold: float = Field(default=0.05, gt=0, description="First Block Cache's residual threshold")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        # A hub id is `org/name`; a path has a separator. Anything else must be a preset: a typo
        # fails here, listing them, instead of after minutes of hub retries.
        if not v.strip():
            raise ValueError("must name a preset, a local folder or a hub id")
        if "/" not in v and os.sep not in v and not v.startswith((".", "~")) and not tiny.is_preset(v):
            raise ValueError(
                f"{v!r} is not a preset ({', '.join(tiny.preset_names())}), a local folder or a hub id (org/name)"
            )
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from kinoray.models.families import FAMILIES

        if v != "auto" and v not in {a.name for a in FAMILIES.values()}:
            names = ", ".join(sorted(a.name for a in FAMILIES.values()))
            raise ValueError(f"unknown family {v!r}; known: auto, {names}")
        return v

    @cached_property
    def path(self) -> str:
        """A local folder for presets and local weights; the hub id otherwise."""
        if tiny.is_preset(self.weights):
            return str(tiny.ensure(self.weights))
        local = os.path.expanduser(self.weights)
        return local if os.path.isdir(local) else self.weights

    @property
    def identity(self) -> str:
        """The weights this spec names, as part of a request's derived id."""
        return self.weights if self.revision is None else f"{self.weights}@{self.revision}"

    def read_config(self, name: str, subfolder: str | None = None) -> dict[str, Any]:
        """A JSON config file of the checkpoint, without loading any weights."""
        path = self.path
        if os.path.isdir(path):
            with open(os.path.join(path, subfolder or "", name)) as f:
                return json.load(f)
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(path, name, subfolder=subfolder, revision=self.revision)
        with open(local) as f:
            return json.load(f)

    @cached_property
    def model_index(self) -> dict[str, Any]:
        return self.read_config("model_index.json")

    @property
    def info(self) -> ModelInfo:
        """What this checkpoint accepts (cached per spec); see `ModelInfo`."""
        from kinoray.models.families import model_info

        return model_info(self)

    @property
    def resolved_family(self) -> str:
        return self.info.family

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

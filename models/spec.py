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

    weights: str = Field(
        default_factory=lambda: os.environ.get("KINORAY_MODEL") or tiny.DEFAULT_MODEL,
        validate_default=True,
        description=f"preset name, local path or hub id (default: $KINORAY_MODEL, else {tiny.DEFAULT_MODEL})",
    )
    family: str = Field(default="auto", description="auto: from model_index.json's pipeline class")
    revision: str | None = None
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = Field(default="auto", description="auto: cuda when available, else cpu")
    max_sequence_length: int | None = Field(
        default=None,
        ge=1,
        description="text tokens, padding included (default: the checkpoint's kinoray.json, else the family's)",
    )
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
        try:
            return cls._check_weights(v)
        except ValueError as exc:
            if v == os.environ.get("KINORAY_MODEL"):  # a shell's default, not the command's
                raise ValueError(f"{exc} (set by $KINORAY_MODEL)") from None
            raise

    @staticmethod
    def _check_weights(v: str) -> str:
        # A hub id is `org/name`; a path has a separator. Anything else must be a preset: a typo
        # fails here, listing them, instead of after minutes of hub retries.
        if not v.strip():
            raise ValueError("must name a preset, a local folder or a hub id")
        if "/" not in v and os.sep not in v and not v.startswith((".", "~")) and not tiny.is_preset(v):
            raise ValueError(
                f"{v!r} is not a preset ({', '.join(tiny.preset_names())}), a local folder or a hub id (org/name)"
            )
        local = os.path.expanduser(v)
        if v.startswith((os.sep, ".", "~")) or os.path.isdir(local):  # a path, not a hub id
            if not os.path.isdir(local):
                raise ValueError(f"no such folder: {v}")
            if not os.path.isfile(os.path.join(local, "model_index.json")):
                raise ValueError(f"{v} is not a diffusers pipeline folder (it has no model_index.json)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N, mps or xpu")
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
            try:
                with open(os.path.join(path, subfolder or "", name)) as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelError(
                    f"{self.weights}: cannot read {os.path.join(subfolder or '', name)}: {exc}"
                ) from None
        with open(hub_file(path, name, subfolder, self.revision)) as f:
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


class ModelError(ValueError):
    """Weights that cannot be found or reached: the message says what to do."""


def hub_file(repo: str, name: str, subfolder: str | None, revision: str | None) -> str:
    """A checkpoint file from the Hugging Face hub (or its cache): its local path.

    One probe without retries first: `hf_hub_download` retries an unreachable hub for ~25 s
    before it falls back to the cache. Raises ModelError saying what to do.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}/{subfolder + '/' if subfolder else ''}{name}"
    offline = bool(constants.HF_HUB_OFFLINE)
    if not offline:
        try:
            get_hf_file_metadata(hf_hub_url(repo, name, subfolder=subfolder, revision=revision), timeout=10)
        except GatedRepoError:
            raise ModelError(
                f"{repo} is gated on the Hugging Face hub: accept its terms, then `hf auth login`"
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise ModelError(
                f"no model {repo!r}{f' at revision {revision!r}' if revision else ''} on the Hugging "
                "Face hub (a private one needs `hf auth login`), and no local folder of that name"
            ) from None
        except EntryNotFoundError:
            raise ModelError(
                f"{repo} has no {where.split('/', 2)[-1]}"
                + (": not a diffusers pipeline" if name.endswith(".json") else "")
            ) from None
        except Exception:  # the hub cannot be reached: the cache may still have the file
            offline = True
    try:
        return hf_hub_download(repo, name, subfolder=subfolder, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"cannot reach the Hugging Face hub for {where}, and it is not in the local cache: "
            "check the network (HF_ENDPOINT for a mirror), or give a local diffusers folder"
            + ("; HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "")
        ) from None

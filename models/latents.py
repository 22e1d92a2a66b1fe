"""Saved latents: denoised work that could not be decoded, kept to be decoded later.

A safetensors file (https://github.com/huggingface/safetensors) holding one tensor, `latents`
(one row's, float32, in the family's latent layout), and as metadata the request that made
it (its flat row, JSON) and that request's digest.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

FORMAT = "kinoray-latents/1"
SUFFIX = ".safetensors"


def dump_latents(latents: np.ndarray, request: dict[str, Any], digest: str) -> bytes:
    """One row's latents and its request as safetensors bytes."""
    from safetensors.numpy import save

    metadata = {"format": FORMAT, "request": json.dumps(request, default=str), "request_digest": digest}
    return save({"latents": np.ascontiguousarray(latents, dtype=np.float32)}, metadata=metadata)


def load_latents(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    """(latents, metadata) from `dump_latents` bytes; raises ValueError for another file."""
    from safetensors.numpy import load

    tensors = load(data)
    if "latents" not in tensors:
        raise ValueError("not a kinoray latents file: no 'latents' tensor")
    # The format: an 8-byte little-endian header length, then the JSON header with __metadata__.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a kinoray latents file: format {metadata.get('format')!r}")
    return tensors["latents"], metadata

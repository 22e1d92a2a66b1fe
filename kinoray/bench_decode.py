"""`kinoray bench --decode-memory`: measure each family's VAE decode memory factor on its tiny preset.

For the rule in `kinoray.models.decode_plan`: one decode of a large clip in a fresh process; its
peak resident memory minus the peak before it, less the decoded output, over
`rows * frames decoded at once * height * width * widest decoder channels * itemsize`. The
factors it prints are the `decode_memory_factor` constants of the family adapters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

# (preset, frames, height, width): large enough that activations dominate the allocator's noise.
CASES = [
    ("tiny-wan", 17, 512, 512),
    ("tiny-cogvideox", 17, 512, 512),
    ("tiny-ltx", 17, 512, 512),
    ("tiny-hunyuan", 17, 512, 512),
    ("tiny-flux", 1, 1024, 1024),
]


def measure(preset: str, frames: int, height: int, width: int) -> dict[str, Any]:
    """In this (fresh) process: decode one clip of the given output shape; peak memory figures."""
    import resource

    import numpy as np

    from kinoray.models.spec import ModelSpec
    from kinoray.models.stages import Decoder

    spec = ModelSpec(weights=preset)
    info = spec.info
    decoder = Decoder(spec)
    adapter = decoder.adapter
    latent_frames = (frames - 1) // info.vae_scale_factor_temporal + 1 if frames > 1 else 1
    shape = adapter.latent_shape(
        latent_frames, height // info.vae_scale_factor_spatial, width // info.vae_scale_factor_spatial
    )
    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, *shape[:-2], 2, 2), dtype=np.float32)
    adapter.decode(small)  # warm-up: kernels, allocator pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = adapter.decode(rng.standard_normal((1, *shape), dtype=np.float32))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    chunk = adapter.decode_chunk_frames or out.shape[1]
    volume = min(out.shape[1], chunk) * out.shape[2] * out.shape[3]
    channels = adapter.vae_channels(spec)
    growth = after - before - out.nbytes * 5  # uint8 frames plus the float32 frames they came from
    return {
        "preset": preset,
        "frames": out.shape[1],
        "size": [out.shape[2], out.shape[3]],
        "channels": channels,
        "peak_growth_mb": round((after - before) / 2**20, 1),
        "factor": round(max(growth, 0) / (volume * channels * 4), 2),
    }


def run() -> list[dict[str, Any]]:
    results = []
    for preset, frames, height, width in CASES:
        code = f"import json; from kinoray.bench_decode import measure; print(json.dumps(measure({preset!r}, {frames}, {height}, {width})))"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [f"{'preset':<18}{'frames':>7}{'size':>11}{'channels':>10}{'peak +MB':>10}{'factor':>8}"]
    for r in results:
        size = "x".join(map(str, r["size"]))
        lines.append(
            f"{r['preset']:<18}{r['frames']:>7}{size:>11}{r['channels']:>10}{r['peak_growth_mb']:>10}{r['factor']:>8}"
        )
    return "\n".join(lines)

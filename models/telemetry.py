"""kinoray's metrics, recorded where the work happens.

Inside Ray (bulk actors, Serve replicas) they are `ray.util.metrics`, which Ray's agent exports
on each node's metrics port with a `ray_` prefix (`ray_kinoray_videos_total`). Outside Ray (an
in-process `kinoray generate`) recording is a no-op, so the stages stay usable without Ray.
"""

from __future__ import annotations

import threading
from typing import Any

LATENCY_BUCKETS: list[float] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
BATCH_BUCKETS: list[float] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]

# name -> (kind, description, tag keys, buckets)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "kinoray_rows_total": ("counter", "Rows processed by a stage, by outcome", ("stage", "status"), None),
    "kinoray_errors_total": ("counter", "Rows that failed, by stage and reason", ("stage", "reason"), None),
    "kinoray_videos_total": ("counter", "Videos generated and stored", ("frontend",), None),
    "kinoray_frames_total": ("counter", "Frames generated and stored", ("frontend",), None),
    "kinoray_stage_latency_seconds": (
        "histogram",
        "Time a row spends in a stage call",
        ("stage",),
        LATENCY_BUCKETS,
    ),
    "kinoray_batch_size": ("histogram", "Rows per stage call", ("stage",), BATCH_BUCKETS),
    "kinoray_in_flight": ("gauge", "Rows being computed by a stage replica", ("stage",), None),
    "kinoray_denoise_steps_total": ("counter", "Denoising steps done, summed over rows", (), None),
    "kinoray_jobs_in_flight": ("gauge", "Online video jobs accepted and not finished", (), None),
    "kinoray_jobs_cancelled_total": (
        "counter",
        "Online requests stopped before they finished: videos deleted, images whose client left",
        ("kind",),
        None,
    ),
    "kinoray_webhook_deliveries_total": (
        "counter",
        "Webhook delivery attempts by event type and outcome (delivered, retried, given_up)",
        ("type", "outcome"),
        None,
    ),
    "kinoray_decode_plans_total": (
        "counter",
        "VAE decode calls by plan (whole, split, tiled, tiled_small)",
        ("plan",),
        None,
    ),
    "kinoray_decode_oom_retries_total": (
        "counter",
        "VAE decode calls that ran out of memory (retried with a leaner plan while one is left)",
        (),
        None,
    ),
    "kinoray_latents_saved_total": (
        "counter",
        "Rows whose latents were saved because no decode plan fit in memory",
        ("frontend",),
        None,
    ),
    "kinoray_latents_resumed_total": ("counter", "Rows decoded from latents an earlier run saved", (), None),
    "kinoray_lora_loads_total": (
        "counter",
        "LoRA adapters loaded by a stage replica (the denoiser; the encoder for FLUX.1 and SD3)",
        ("lora", "stage"),
        None,
    ),
    "kinoray_lora_evictions_total": (
        "counter",
        "LoRA adapters a stage replica unloaded to make room (least recently used)",
        ("lora", "stage"),
        None,
    ),
    "kinoray_lora_hits_total": (
        "counter",
        "Stage calls that found their LoRA adapter loaded already",
        ("lora", "stage"),
        None,
    ),
}

_lock = threading.Lock()
_made: dict[str, Any] = {}


def _ray_metric(name: str) -> Any:
    try:
        import ray
        from ray.util import metrics
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    with _lock:
        if name not in _made:
            kind, desc, tags, buckets = METRICS[name]
            if kind == "counter":
                _made[name] = metrics.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                _made[name] = metrics.Gauge(name, description=desc, tag_keys=tags)
            else:
                _made[name] = metrics.Histogram(
                    name, description=desc, boundaries=buckets or [], tag_keys=tags
                )
        return _made[name]


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    if value and (m := _ray_metric(name)) is not None:
        m.inc(value, tags=tags or None)


def observe(name: str, value: float, **tags: str) -> None:
    if (m := _ray_metric(name)) is not None:
        m.observe(value, tags=tags or None)


def set_gauge(name: str, value: float, **tags: str) -> None:
    if (m := _ray_metric(name)) is not None:
        m.set(value, tags=tags or None)


def record_stage(stage: str, seconds: float, rows: int, reasons: list[str]) -> None:
    """One stage call: `rows` computed in `seconds`; `reasons` those of the rows that failed."""
    observe("kinoray_batch_size", rows, stage=stage)
    for _ in range(rows):
        observe("kinoray_stage_latency_seconds", seconds, stage=stage)
    inc("kinoray_rows_total", rows - len(reasons), stage=stage, status="ok")
    inc("kinoray_rows_total", len(reasons), stage=stage, status="failed")
    for reason in reasons:
        inc("kinoray_errors_total", stage=stage, reason=reason)

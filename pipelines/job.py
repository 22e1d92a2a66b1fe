"""A bulk job: prompt table -> encode pool -> denoise pool -> decode pool -> videos + manifest."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kinoray.models.config import KinorayConfig, StageConfig
from kinoray.models.request import ID_PATTERN, SAMPLING_FIELDS, RequestError
from kinoray.models.stages import Decoder, Denoiser, TextEncoder
from kinoray.pipelines import manifest
from kinoray.pipelines.progress import JobMetrics
from kinoray.pipelines.table import ERROR_KEY, read_prompt_table
from kinoray.pipelines.writer import write_videos

log = logging.getLogger(__name__)


@dataclass
class JobSummary:
    output: str
    run: str
    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(
        default_factory=lambda: {"encode": 0.0, "denoise": 0.0, "decode": 0.0, "write": 0.0}
    )

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def render(self) -> str:
        busy = ", ".join(f"{k} {v:.1f}s" for k, v in self.busy_s.items())
        return (
            f"rows: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (of {self.total})\n"
            f"wall time: {self.wall_s:.1f}s, {self.videos_per_minute:.1f} videos/min\n"
            f"stage busy time: {busy}\n"
            f"manifest: {manifest.join(self.output, manifest.MANIFEST_DIR)}"
        )


def _run_id() -> str:
    # Sorts by start time: the manifest keeps the latest run's row for an id.
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def plan_rows(
    rows: list[dict[str, Any]], config: KinorayConfig, done: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Validate rows -> (requests to generate, failed manifest rows, count skipped as done)."""
    builder = config.request_builder()
    todo: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = 0
    for n, raw in enumerate(rows):
        raw_id = raw.get("id")
        fallback_id = str(raw_id) if isinstance(raw_id, str) and ID_PATTERN.match(raw_id) else f"row-{n}"
        if ERROR_KEY in raw:
            failed.append({"id": fallback_id, "row": n, **_failure(raw[ERROR_KEY], "invalid_row")})
            continue
        try:
            req = builder.build(raw)
        except RequestError as exc:
            prompt = raw.get("prompt") if isinstance(raw.get("prompt"), str) else None
            failed.append(
                {"id": fallback_id, "row": n, "prompt": prompt, **_failure(str(exc), "invalid_request")}
            )
            continue
        if req.id in seen:
            failed.append(
                {
                    "id": f"row-{n}",
                    "row": n,
                    "prompt": req.prompt,
                    **_failure(f"duplicate id {req.id!r}", "duplicate_id"),
                }
            )
            continue
        seen.add(req.id)
        if req.id in done:
            skipped += 1
            continue
        todo.append({**req.row(), "row": n})
    # Shape buckets: rows of one shape arrive together, so the denoiser's batches stay full.
    todo.sort(key=lambda r: (*(str(r[c]) for c in SAMPLING_FIELDS), r["row"]))
    return todo, failed, skipped


def _failure(message: str, reason: str) -> dict[str, Any]:
    return {"status": "failed", "error": message, "error_stage": "validate", "error_reason": reason}


def _pool(stage: StageConfig) -> dict[str, Any]:
    import ray.data

    # Ray Data restarts a dead pool actor and retries its batches by default (max_restarts=-1).
    return {
        "compute": ray.data.ActorPoolStrategy(
            min_size=max(1, stage.min_replicas), max_size=stage.max_replicas
        ),
        "batch_size": stage.batch_size,
        "batch_format": "numpy",
        **stage.ray_resources(),
    }


def build_dataset(todo: list[dict[str, Any]], config: KinorayConfig, output: str, run: str) -> Any:
    import ray.data

    spec = config.model.model_dump()
    blocks = max(1, math.ceil(len(todo) / config.encoder.batch_size))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    ds = ds.map_batches(TextEncoder, fn_constructor_kwargs={"model": spec}, **_pool(config.encoder))
    ds = ds.map_batches(
        Denoiser,
        fn_constructor_kwargs={"model": spec, "max_batch_size": config.denoiser.batch_size},
        **_pool(config.denoiser),
    )
    ds = ds.map_batches(
        Decoder,
        fn_constructor_kwargs={"model": spec, "max_batch_size": config.decoder.batch_size},
        **_pool(config.decoder),
    )
    return ds.map_batches(
        write_videos,
        fn_kwargs={"output": output, "run": run},
        batch_size=config.decoder.batch_size,
        batch_format="numpy",
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=config.batch.write_concurrency),
    )


def _init_ray(config: KinorayConfig, address: str | None, num_cpus: int | None) -> None:
    import ray
    import ray.data

    # The job draws its own progress bar; Ray Data's per-operator progress is noise here.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)  # an existing cluster (a RayJob sets RAY_ADDRESS)
        return
    # A local cluster gets enough logical CPUs for one actor per stage plus the writers.
    stages = (config.encoder, config.denoiser, config.decoder)
    need = math.ceil(sum(s.num_cpus * max(1, s.min_replicas) for s in stages) + 1)
    ray.init(
        num_cpus=num_cpus or max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=False
    )


def run_job(
    prompts: str,
    output: str,
    config: KinorayConfig | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    on_rows: Callable[[int], None] | None = None,
) -> JobSummary:
    """Generate every row of `prompts` not already done in `output`; see the summary for counts.

    `on_rows(n)` is called as each batch of `n` finished rows reaches the driver.
    """
    config = config or KinorayConfig()
    start = time.perf_counter()
    rows = read_prompt_table(prompts)  # a bad file fails here, before any model is loaded
    run = _run_id()
    summary = JobSummary(output=output, run=run, total=len(rows))
    todo, failed, summary.skipped = plan_rows(rows, config, manifest.done_ids(output))
    metrics = JobMetrics(run, len(rows), config.batch.metrics_port, config.batch.pushgateway)
    metrics.add("skipped", summary.skipped)
    if failed:
        manifest.write_part(output, manifest.to_table(failed), run)
        summary.failed += len(failed)
        metrics.add("failed", len(failed))
    try:
        _generate(todo, config, output, run, summary, metrics, ray_address, num_cpus, progress, on_rows)
    finally:
        metrics.finish()
    manifest.compact(output, run)
    summary.wall_s = time.perf_counter() - start
    return summary


def _generate(
    todo: list[dict[str, Any]],
    config: KinorayConfig,
    output: str,
    run: str,
    summary: JobSummary,
    metrics: JobMetrics,
    ray_address: str | None,
    num_cpus: int | None,
    progress: bool,
    on_rows: Callable[[int], None] | None,
) -> None:
    if not todo:
        return
    _init_ray(config, ray_address, num_cpus)
    bar = _progress_bar(len(todo), progress)
    for batch in build_dataset(todo, config, output, run).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        table = batch.select(manifest.SCHEMA.names).cast(manifest.SCHEMA)
        manifest.write_part(output, table, run)
        for r in table.select(["status", "encode_s", "denoise_s", "decode_s", "write_s"]).to_pylist():
            summary.ok += r["status"] == "ok"
            summary.failed += r["status"] != "ok"
            metrics.add(r["status"])
            for stage in summary.busy_s:
                summary.busy_s[stage] += r[f"{stage}_s"] or 0.0
        if bar is not None:
            bar.update(table.num_rows)
        if on_rows is not None:
            on_rows(table.num_rows)
    if bar is not None:
        bar.close()


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="video", desc="kinoray", file=sys.stderr, mininterval=1.0)

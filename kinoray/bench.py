"""`kinoray bench`: kinoray against the ways people generate videos in bulk today.

Side by side, in one process tree, on the same model and prompts:
  (a) the diffusers pipeline called in a loop, one prompt at a time;
  (b) one Ray Data `map_batches` stage holding the whole pipeline per actor;
  (c) kinoray's three-stage bulk job.
Each writes the same MP4 files. Throughput is measured in steady state: from the first finished
video to the last, so process and model start-up (paid once per job) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kinoray.models.config import DecoderConfig, DenoiserConfig, KinorayConfig, StageConfig
from kinoray.models.request import GenerationRequest
from kinoray.models.spec import ModelSpec

BENCH_MODEL = "bench-wan"


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray's workers included)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class Clock:
    """Completion times of videos, for start-up and steady-state throughput."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.done: list[tuple[float, int]] = []

    def finished(self, n: int = 1) -> None:
        self.done.append((time.perf_counter(), n))

    def result(self, name: str, peak: int) -> dict[str, Any]:
        total = sum(n for _, n in self.done)
        (t_first, n_first), t_last = self.done[0], self.done[-1][0]
        # Steady state: from the first finished video to the last. A run whose videos all
        # finished at once (one batch) has none; its rate is then over the whole wall time.
        steady = t_last > t_first
        n, s = (total - n_first, t_last - t_first) if steady else (total, t_last - self.start)
        return {
            "name": name,
            "videos": total,
            "wall_s": round(t_last - self.start, 3),
            "first_video_s": round(t_first - self.start, 3),
            "steady": steady,
            "measured_videos": n,
            "measured_s": round(s, 3),
            "videos_per_minute": round(60.0 * n / s, 2),
            "peak_memory_gb": round(peak / 1024**3, 2),
        }


def _requests(config: KinorayConfig, rows: int) -> list[GenerationRequest]:
    builder = config.request_builder()
    return [
        builder.build({"prompt": f"benchmark prompt {i}: a slow pan over a city at dusk", "seed": i})
        for i in range(rows)
    ]


def _write(out: Path, rid: str, frames: np.ndarray, fps: int) -> None:
    from kinoray.models.video import encode_video, video_suffix

    (out / f"{rid}{video_suffix(frames.shape[0])}").write_bytes(encode_video(frames, fps))


def bare_compute(config: KinorayConfig, reqs: list[GenerationRequest], out: Path) -> dict[str, float]:
    """Seconds each stage computes for the work, in this process with the job's batch sizes,
    writing the same video files: the work kinoray's overhead is measured against."""
    from kinoray.models.local import LocalPipeline
    from kinoray.models.stages import requests_to_batch

    local = LocalPipeline(config)
    local.run(reqs[:1])  # warm-up
    local.encoder._cache.clear()
    busy = {"encode": 0.0, "denoise": 0.0, "decode": 0.0, "write": 0.0}
    size = config.denoiser.batch_size
    for i in range(0, len(reqs), size):
        chunk = reqs[i : i + size]
        t0 = time.perf_counter()
        b = local.encoder(requests_to_batch(chunk))
        t1 = time.perf_counter()
        b = local.denoiser(b)
        t2 = time.perf_counter()
        b = local.decoder(b)
        t3 = time.perf_counter()
        for r, frames in zip(chunk, b["frames"]):
            _write(out, r.id, frames, r.sampling.fps)
        t4 = time.perf_counter()
        busy["encode"] += t1 - t0
        busy["denoise"] += t2 - t1
        busy["decode"] += t3 - t2
        busy["write"] += t4 - t3
    return busy


def diffusers_loop(config: KinorayConfig, reqs: list[GenerationRequest], out: Path) -> dict[str, Any]:
    """(a) What most users write: load the pipeline, call it once per prompt, save the file."""
    from kinoray.models.families import adapter_class, load_pipeline

    spec = config.model
    adapter = adapter_class(spec)
    with PeakMemory() as mem:
        clock = Clock()
        pipe = load_pipeline(spec)
        for r in reqs:
            _write(out, r.id, adapter.generate(spec, pipe, [r])[0], r.sampling.fps)
            clock.finished()
    return clock.result("diffusers loop", mem.peak)


class WholePipeline:
    """(b) The usual Ray Data example: one actor holds the whole diffusers pipeline."""

    def __init__(self, model: dict[str, Any], out: str):
        from kinoray.models.families import adapter_class, load_pipeline

        spec = ModelSpec(**model)
        self.spec = spec
        self.adapter = adapter_class(spec)
        self.pipe = load_pipeline(spec)
        self.out = Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kinoray.models.stages import batch_to_rows

        reqs = [GenerationRequest.from_row(r) for r in batch_to_rows(batch)]
        for r, frames in zip(reqs, self.adapter.generate(self.spec, self.pipe, reqs)):
            _write(self.out, r.id, frames, r.sampling.fps)
        return {"id": batch["id"]}


def ray_one_stage(
    config: KinorayConfig, reqs: list[GenerationRequest], out: Path, cpus: float
) -> dict[str, Any]:
    import ray.data

    with PeakMemory() as mem:
        clock = Clock()
        ds = ray.data.from_items(
            [r.row() for r in reqs], override_num_blocks=max(1, len(reqs) // config.denoiser.batch_size)
        )
        ds = ds.map_batches(
            WholePipeline,
            fn_constructor_kwargs={"model": config.model.model_dump(), "out": str(out)},
            batch_size=config.denoiser.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=cpus,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            clock.finished(len(batch["id"]))
    return clock.result("Ray Data, one stage", mem.peak)


def kinoray_job(
    config: KinorayConfig, reqs: list[GenerationRequest], out: Path
) -> tuple[dict[str, Any], Any]:
    from kinoray.pipelines.job import run_job

    table = out.parent / f"{out.name}-prompts.jsonl"
    table.write_text("".join(json.dumps(r.row()) + "\n" for r in reqs))
    with PeakMemory() as mem:
        clock = Clock()
        summary = run_job(str(table), str(out), config, progress=False, on_rows=clock.finished)
    return clock.result("kinoray, three stages", mem.peak), summary


def bench_config(model: str, device: str | None) -> KinorayConfig:
    """kinoray on this machine. On a GPU: the denoiser gets most of the device. On CPUs: every
    stage actor runs one thread (Ray sets OMP_NUM_THREADS from num_cpus) and the denoiser, ~2/3
    of the compute, gets one actor per core; one thread per actor avoids the poor multi-thread
    scaling of small models, and the encoder and decoder fill the cores' gaps."""
    gpu = device is not None and device.startswith("cuda")
    cores = os.cpu_count() or 2
    if gpu:
        return KinorayConfig(
            model=ModelSpec(weights=model, device=device or "auto"),
            encoder=StageConfig(num_cpus=0, num_gpus=0.1, batch_size=4),
            denoiser=DenoiserConfig(num_cpus=0, num_gpus=0.8, batch_size=4),
            decoder=DecoderConfig(num_cpus=0, num_gpus=0.1, batch_size=4),
        )
    return KinorayConfig(
        model=ModelSpec(weights=model, device=device or "auto"),
        encoder=StageConfig(num_cpus=0.5, batch_size=4),
        denoiser=DenoiserConfig(num_cpus=1, batch_size=4, min_replicas=cores, max_replicas=cores),
        decoder=DecoderConfig(num_cpus=0.5, batch_size=4),
    )


def online(config: KinorayConfig, requests: int, levels: list[int], store: Path) -> list[dict[str, Any]]:
    """Load the Serve app from a second process at each concurrency; level 1 is the baseline."""
    import socket
    import subprocess
    import sys

    from ray import serve

    from kinoray.deployments.app import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config.model_copy(
        update={"serve": config.serve.model_copy(update={"storage": str(store), "max_queued_requests": 1024})}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"

    def load(requests: int, concurrency: int) -> dict[str, Any]:
        cmd = [
            "-m",
            "kinoray.loadgen",
            "--base",
            base,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
        ]
        out = subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        load(2, 2)  # warm-up: every replica has run once
        results = [load(requests, c) for c in levels]
    finally:
        serve.shutdown()
    return results


def run(
    model: str, rows: int, out_dir: Path, device: str | None = None, online_requests: int = 0
) -> dict[str, Any]:
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    config = bench_config(model, device)
    reqs = _requests(config, rows)
    work = out_dir / "videos"
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("a", "b"):
        (work / sub).mkdir(parents=True)

    (work / "bare").mkdir()
    bare = bare_compute(config, reqs, work / "bare")
    a = diffusers_loop(config, reqs, work / "a")
    cores = os.cpu_count() or 2
    ray.init(
        num_cpus=cores + 2,
        num_gpus=1 if device and device.startswith("cuda") else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        b = ray_one_stage(config, reqs, work / "b", cpus=cores)
        c, summary = kinoray_job(config, reqs, work / "c")
        serving = online(config, online_requests, [1, 4, 8], out_dir / "store") if online_requests else []
    finally:
        ray.shutdown()

    bare_total = sum(bare.values())
    measured_share = c["measured_videos"] / rows
    result = {
        "model": model,
        "rows": rows,
        "cores": cores,
        "shape": reqs[0].sampling.model_dump(
            include={"height", "width", "num_frames", "num_inference_steps"}
        ),
        "bare_stage_compute_s": {k: round(v, 3) for k, v in bare.items()},
        "runs": [a, b, c],
        "ratio_kinoray_vs_diffusers_loop": round(c["videos_per_minute"] / a["videos_per_minute"], 3),
        "ratio_kinoray_vs_ray_one_stage": round(c["videos_per_minute"] / b["videos_per_minute"], 3),
        # Wall time of kinoray's steady state over the bare compute of the same rows in-process.
        "kinoray_overhead": round(c["measured_s"] / (bare_total * measured_share), 3),
        # Busy seconds per wall second of each actor in steady state: the measured rows' share of
        # a stage's busy time over the steady window (start-up, when pools load, excluded).
        "kinoray_stage_busy_fraction": {
            k: round(v * measured_share / c["measured_s"] / _actors(config, k), 3)
            for k, v in summary.busy_s.items()
        },
        "online": serving,
    }
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out_dir / "bench.png")
    return result


def _actors(config: KinorayConfig, stage: str) -> int:
    pools = {"encode": config.encoder, "denoise": config.denoiser, "decode": config.decoder}
    return pools[stage].max_replicas if stage in pools else config.batch.write_concurrency


def chart(result: dict[str, Any], path: Path) -> None:
    """A bar chart of videos per minute, drawn with Pillow."""
    from PIL import Image, ImageDraw

    runs = result["runs"]
    w, h, pad, bar_h = 720, 80 + 70 * len(runs), 20, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (pad, pad),
        f"videos per minute, steady state ({result['model']}, {result['rows']} rows, {result['cores']} cores)",
        fill="black",
    )
    best = max(r["videos_per_minute"] for r in runs)
    colors = ["#9aa5b1", "#7b93db", "#e4572e"]
    for i, r in enumerate(runs):
        y = 60 + i * 70
        length = int((w - 2 * pad - 160) * r["videos_per_minute"] / best)
        d.text((pad, y), r["name"], fill="black")
        d.rectangle([pad, y + 16, pad + length, y + 16 + bar_h - 10], fill=colors[i % 3])
        d.text((pad + length + 8, y + 22), f"{r['videos_per_minute']:.1f}", fill="black")
    img.save(path)


def render(result: dict[str, Any]) -> str:
    lines = [f"{'approach':<24}{'videos/min':>12}{'wall s':>9}{'1st video s':>13}{'peak GB':>9}"]
    for r in result["runs"]:
        lines.append(
            f"{r['name']:<24}{r['videos_per_minute']:>12.1f}{r['wall_s']:>9.1f}{r['first_video_s']:>13.1f}{r['peak_memory_gb']:>9.2f}"
        )
    lines += [
        f"kinoray / diffusers loop:  {result['ratio_kinoray_vs_diffusers_loop']:.2f}x",
        f"kinoray / Ray one stage:   {result['ratio_kinoray_vs_ray_one_stage']:.2f}x",
        f"kinoray overhead:          {result['kinoray_overhead']:.2f} (steady wall / bare stage compute)",
        "busy fraction per actor:   "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["kinoray_stage_busy_fraction"].items()),
    ]
    if result["online"]:
        base = result["online"][0]["videos_per_minute"]
        lines.append(
            f"\n{'online concurrency':<20}{'videos/min':>12}{'vs 1 at a time':>16}{'p50 s':>8}{'p99 s':>8}"
        )
        for r in result["online"]:
            lines.append(
                f"{r['concurrency']:<20}{r['videos_per_minute']:>12.1f}{r['videos_per_minute'] / base:>15.2f}x{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.decode_memory:
        from kinoray import bench_decode

        print(bench_decode.render(bench_decode.run()))
        return 0
    if args.status_reads:
        from kinoray import bench_polling

        print(bench_polling.render(bench_polling.run(Path(args.out), args.baseline)))
        print(f"\nwritten: {Path(args.out) / 'status_reads.json'}")
        return 0
    if args.startup:
        from kinoray import bench_startup

        print(bench_startup.render(bench_startup.run(Path(args.out), args.baseline, args.repeat)))
        print(f"\nwritten: {Path(args.out) / 'startup.json'}")
        return 0
    if args.scale:
        from kinoray import bench_scale

        scale = bench_scale.run(args.scale, Path(args.out))
        print(bench_scale.render(scale))
        print(f"\nwritten: {Path(args.out) / 'scale.json'}")
        return 0
    result = run(args.weights or BENCH_MODEL, args.rows, Path(args.out), args.device, args.online_requests)
    print(render(result))
    print(f"\nwritten: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.png'}")
    return 0

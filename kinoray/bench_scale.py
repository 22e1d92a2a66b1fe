"""`kinoray bench --scale ROWS`: how a bulk job handles a table of millions of rows.

Writes a generated table as one JSONL file and as 8 Parquet parts, then runs `kinoray batch` on
each as its own process, as a user would:
  - `--dry-run`: rows validated per second and the driver process's peak RSS (the driver must
    never hold the table);
  - a real job: the time from the command to the first finished video, against the same for a
    10-row table (generation must start while the rest is still being read).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
THINGS = ["fox", "boat", "kite", "car", "tree", "lighthouse", "balloon", "train"]
PARTS = 8
SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("height", pa.int64())]
)
CHUNK = 100_000


def _chunk(start: int, stop: int) -> pa.Table:
    ids = [f"row-{i:08d}" for i in range(start, stop)]
    prompts = [
        f"a {COLOURS[i % 8]} {THINGS[(i // 8) % 8]} in scene {i}, slow pan, soft light"
        for i in range(start, stop)
    ]
    # A quarter of the rows ask for another size: the plan's shape histogram has two buckets.
    heights = [32 if i % 4 == 0 else None for i in range(start, stop)]
    return pa.table(
        {"id": ids, "prompt": prompts, "seed": list(range(start, stop)), "height": heights}, schema=SCHEMA
    )


def write_tables(rows: int, folder: Path) -> tuple[Path, Path]:
    """`rows` rows as one JSONL file and as a folder of `PARTS` Parquet parts (written in chunks)."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, parts = folder / f"scale-{rows}.jsonl", folder / f"scale-{rows}-parquet"
    if not jsonl.exists():
        with open(jsonl, "w") as f:
            for start in range(0, rows, CHUNK):
                for row in _chunk(start, min(rows, start + CHUNK)).to_pylist():
                    f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    if not parts.exists():
        parts.mkdir()
        per_part = -(-rows // PARTS)
        for k in range(PARTS):
            lo, hi = k * per_part, min(rows, (k + 1) * per_part)
            with pq.ParquetWriter(parts / f"part-{k:05d}.parquet", SCHEMA) as writer:
                for start in range(lo, hi, CHUNK):
                    writer.write_table(_chunk(start, min(hi, start + CHUNK)))
    return jsonl, parts


class _Watch:
    """Peak RSS of one process (not its children: Ray's own processes are not the driver)."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:
                return
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def dry_run(source: Path, rows: int, out: Path) -> dict[str, Any]:
    """`kinoray batch SOURCE --dry-run`: wall time, rows per second, the driver's peak RSS."""
    cmd = [sys.executable, "-m", "kinoray.cli", "batch", str(source), "-o", str(out), "--dry-run"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    watch = _Watch(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    peak = watch.stop()
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"dry run failed ({proc.returncode}): {stderr[-2000:]}")
    return {
        "source": source.name,
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall),
        "driver_peak_rss_mb": round(peak / 2**20),
        "plan": stdout.strip().splitlines()[:3],
    }


def first_video(source: Path, out: Path) -> float:
    """Seconds from `kinoray batch SOURCE` to its first finished video; the job is then stopped."""
    cmd = [sys.executable, "-m", "kinoray.cli", "batch", str(source), "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True
    )
    videos = out / "videos"
    try:
        while proc.poll() is None:
            if videos.exists() and any(p.suffix in (".mp4", ".png") for p in videos.iterdir()):
                return round(time.perf_counter() - start, 2)
            time.sleep(0.05)
        raise RuntimeError(f"the job ended ({proc.returncode}) before writing a video")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait()


def run(rows: int, out_dir: Path) -> dict[str, Any]:
    import shutil

    tables = out_dir / "tables"
    jsonl, parts = write_tables(rows, tables)
    small = tables / "scale-10.jsonl"
    write_tables(10, tables)
    work = out_dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "rows": rows,
        "cores": os.cpu_count(),
        "dry_run": [dry_run(jsonl, rows, work / "dry-jsonl"), dry_run(parts, rows, work / "dry-parquet")],
        "first_video_s": {
            "10 rows": first_video(small, work / "first-10"),
            f"{rows} rows": first_video(jsonl, work / "first-big"),
        },
    }
    first = result["first_video_s"]
    result["first_video_ratio"] = round(first[f"{rows} rows"] / first["10 rows"], 2)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"{'dry run':<28}{'rows':>10}{'wall s':>9}{'rows/s':>10}{'driver peak MB':>16}"]
    for r in result["dry_run"]:
        lines.append(
            f"{r['source']:<28}{r['rows']:>10}{r['wall_s']:>9.1f}{r['rows_per_s']:>10}{r['driver_peak_rss_mb']:>16}"
        )
    lines.append(
        "time to the first finished video: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result["first_video_s"].items())
    )
    lines.append(f"ratio: {result['first_video_ratio']:.2f}x")
    return "\n".join(lines)

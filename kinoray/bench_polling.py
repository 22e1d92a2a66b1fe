"""`kinoray bench --status-reads`: how many status reads a server answers while it generates.

For the current checkout (and, with `baseline`, another one, first on PYTHONPATH), start
`kinoray serve`, start one job, and have 8 then 32 clients read its status back to back for
10 s while it runs and ends (`kinoray.loadgen.status_reads`); ratios are current / baseline
reads per second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kinoray.bench_startup import _env, start_serve, stop_serve

POLLERS = (8, 32)
SECONDS = 10.0
# Long enough on the default model to stay in progress through both measurements.
JOB = {
    "prompt": "a long job to poll",
    "num_inference_steps": 200,
    "height": 128,
    "width": 128,
    "num_frames": 33,
}


def measure(env: dict[str, str]) -> dict[str, Any]:
    from kinoray.loadgen import status_reads

    with tempfile.TemporaryDirectory() as work:
        proc, base, _ = start_serve(Path(work), env)
        try:
            return {f"{n}_pollers": status_reads(base, n, SECONDS, {**JOB, "seed": n}) for n in POLLERS}
        finally:
            stop_serve(proc)


def run(out: Path, baseline: str | None = None) -> dict[str, Any]:
    """Status reads per second of the current (and baseline) server, to `out/status_reads.json`."""
    report: dict[str, Any] = {"current": measure(_env(None))}
    if baseline:
        report["baseline"] = measure(_env(baseline))
        report["current_over_baseline"] = {
            k: round(v["reads_per_s"] / report["baseline"][k]["reads_per_s"], 2)
            for k, v in report["current"].items()
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "status_reads.json").write_text(json.dumps(report, indent=2))
    return report


def render(report: dict[str, Any]) -> str:
    base = "baseline" in report
    lines = [
        f"{'status reads':<14}{'reads/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        + (f"{'base r/s':>10}{'base p99':>10}{'ratio':>8}" if base else "")
    ]
    for key, cur in report["current"].items():
        line = f"{key:<14}{cur['reads_per_s']:>9.1f}{cur['p50_ms']:>8.1f}{cur['p99_ms']:>8.1f}"
        if base:
            old = report["baseline"][key]
            ratio = report["current_over_baseline"][key]
            line += f"{old['reads_per_s']:>10.1f}{old['p99_ms']:>10.1f}{ratio:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)

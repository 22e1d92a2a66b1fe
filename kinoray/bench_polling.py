"""`kinoray bench --status-reads`: how many status reads a server answers while it generates.

For the current checkout (and, with `baseline`, another one, first on PYTHONPATH), start
`kinoray serve`, start one job, and have 8 then 32 clients read its status back to back for
10 s while it runs and ends (`kinoray.loadgen.status_reads`); ratios are current / baseline
reads per second.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kinoray.bench_startup import _cli, _env

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


def _serve(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = work / "serve.yaml"
    config.write_text(f"serve: {{port: {port}, storage: {work / 'store'}}}\n")
    proc = subprocess.Popen(
        _cli("serve", "--config", str(config)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("kinoray serve did not come up")


def measure(env: dict[str, str]) -> dict[str, Any]:
    from kinoray.loadgen import status_reads

    with tempfile.TemporaryDirectory() as work:
        proc, base = _serve(Path(work), env)
        try:
            return {f"{n}_pollers": status_reads(base, n, SECONDS, {**JOB, "seed": n}) for n in POLLERS}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


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

"""`kinoray bench --startup`: how long a new user waits, from the command to its first result.

Each measurement runs the CLI in a fresh process, as a user would: the first video and the end of
an 8-row `kinoray batch`, the first healthy answer of `kinoray serve`, a `kinoray generate`, and
`kinoray generate` with a bad value (the error path). Each is the median of `repeat` runs, and a
run starts once every process of the one before it (a local Ray cluster's workers) has gone.
With `baseline`, the same commands also run against another checkout of kinoray (put first on
PYTHONPATH), interleaved with the current one so that both see the same machine load; ratios
are baseline / current.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = 8
SETTLE_S = 60


def _env(baseline: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if baseline:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [baseline, env.get("PYTHONPATH")]))
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kinoray.cli", *args]


def _settle(session: int) -> None:
    """Wait (up to SETTLE_S) until no process of `session` is left: a local cluster's workers
    outlive the command by a second or two, and would slow the next measurement down."""
    import psutil

    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == session:
                    alive.append(proc)
            except (OSError, psutil.Error):
                pass
        if not alive:
            return
        psutil.wait_procs(alive, timeout=0.5)


def time_batch(work: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds to the first video file and to the end of an 8-row batch."""
    prompts = work / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"start-up clip {i}", "seed": i}) + "\n" for i in range(ROWS))
    )
    out = work / "out"
    start = time.perf_counter()
    proc = subprocess.Popen(
        _cli("batch", str(prompts), "-o", str(out)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = None
    while proc.poll() is None:
        if first is None and any((out / "videos").glob("*.mp4")):
            first = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    _settle(proc.pid)
    if proc.returncode != 0:
        raise RuntimeError(f"kinoray batch exited {proc.returncode}")
    return {"batch_first_video_s": round(first or total, 2), "batch_total_s": round(total, 2)}


def start_serve(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    """`kinoray serve` on a free loopback port with storage under `work`: the process, its base
    URL and the seconds to its first 200 from `/healthz`."""
    import socket

    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = work / "serve.yaml"
    config.write_text(f"serve: {{port: {port}, storage: {work / 'store'}}}\n")
    start = time.perf_counter()
    proc = subprocess.Popen(
        _cli("serve", "--config", str(config)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base, time.perf_counter() - start
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"kinoray serve exited {proc.returncode}")


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    _settle(proc.pid)


def time_serve(work: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds to the first 200 from `/healthz` of `kinoray serve`."""
    proc, _, seconds = start_serve(work, env)
    stop_serve(proc)
    return {"serve_healthy_s": round(seconds, 2)}


def time_generate(work: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds for `kinoray generate` of one video, and for one with a bad value."""
    start = time.perf_counter()
    subprocess.run(
        _cli("generate", "a fox", "-o", str(work / "fox.mp4")), env=env, check=True, capture_output=True
    )
    ok = time.perf_counter() - start
    start = time.perf_counter()
    bad = subprocess.run(_cli("generate", "a fox", "--height", "100"), env=env, capture_output=True)
    error = time.perf_counter() - start
    if bad.returncode == 0:
        raise RuntimeError("kinoray generate --height 100 succeeded")
    return {"generate_s": round(ok, 2), "generate_error_s": round(error, 2)}


def run(out: Path, baseline: str | None = None, repeat: int = 3) -> dict[str, Any]:
    """Current (and baseline) start-up times, each the median of `repeat` runs, written to
    `out/startup.json` with every run's figures; each step runs for the current checkout, then
    for the baseline, before the next step."""
    names = ["current"] + (["baseline"] if baseline else [])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(repeat):
        times: dict[str, dict[str, float]] = {name: {} for name in names}
        for step in (time_generate, time_batch, time_serve):
            for name in names:
                with tempfile.TemporaryDirectory() as work:
                    times[name].update(step(Path(work), _env(baseline if name == "baseline" else None)))
        for name in names:
            runs[name].append(times[name])
    report: dict[str, Any] = {
        name: {k: round(statistics.median(r[k] for r in runs[name]), 2) for k in runs[name][0]}
        for name in names
    }
    if baseline:
        report["baseline_over_current"] = {
            k: round(report["baseline"][k] / v, 2) for k, v in report["current"].items() if v > 0
        }
    report["runs"] = runs
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(report, indent=2))
    return report


def render(report: dict[str, Any]) -> str:
    """The medians as a table; with a baseline, its figures and the ratios."""
    repeat = len(report["runs"]["current"])
    lines = [
        f"{f'start-up (s), median of {repeat}':<32}{'current':>10}"
        + (f"{'baseline':>10}{'ratio':>8}" if "baseline" in report else "")
    ]
    for key, value in report["current"].items():
        line = f"{key:<32}{value:>10.2f}"
        if "baseline" in report:
            line += f"{report['baseline'][key]:>10.2f}{report['baseline_over_current'][key]:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)

"""A load generator for the online API, run as its own process: `python -m kinoray.loadgen`.

Sends `--requests` video jobs at `--concurrency`, polls each until it ends, and prints one JSON
line: throughput and latency percentiles, measured from this side of the loopback. With
`--status-reads SECONDS`, it instead starts one long job and has `--concurrency` clients read
its status back to back for that long: status reads per second and their latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import requests


def one(base: str, body: dict, poll_s: float) -> tuple[float, str]:
    start = time.perf_counter()
    while True:
        resp = requests.post(f"{base}/v1/videos", json=body, timeout=30)
        if resp.status_code != 429:
            break
        time.sleep(float(resp.headers.get("Retry-After", "1")))
    resp.raise_for_status()
    vid = resp.json()["id"]
    while True:
        status = requests.get(f"{base}/v1/videos/{vid}", timeout=30).json()["status"]
        if status in ("completed", "failed"):
            return time.perf_counter() - start, status
        time.sleep(poll_s)


def status_reads(base: str, pollers: int, seconds: float, body: dict) -> dict:
    """`pollers` threads GET one running job's status back to back for `seconds`."""
    resp = requests.post(f"{base}/v1/videos", json=body, timeout=30)
    resp.raise_for_status()
    url = f"{base}/v1/videos/{resp.json()['id']}"
    latencies: list[list[float]] = [[] for _ in range(pollers)]
    statuses: set[str] = set()
    counted_from = time.perf_counter() + 1.0  # a second of warm-up, not counted
    stop = counted_from + seconds

    def poller(k: int) -> None:
        with requests.Session() as session:
            while time.perf_counter() < counted_from:
                session.get(url, timeout=30)
            while time.perf_counter() < stop:
                sent = time.perf_counter()
                answer = session.get(url, timeout=30)
                latencies[k].append(time.perf_counter() - sent)
                statuses.add(answer.json()["status"] if answer.ok else str(answer.status_code))

    threads = [threading.Thread(target=poller, args=(k,)) for k in range(pollers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requests.delete(url, timeout=30)
    lat = np.concatenate([np.array(x) for x in latencies])
    return {
        "pollers": pollers,
        "reads_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1),
        "statuses": sorted(statuses),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="http://host:port")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--poll",
        type=float,
        default=0.5,
        help="seconds between status polls (the openai SDK polls every 1 s)",
    )
    p.add_argument("--status-reads", type=float, metavar="SECONDS", help="measure status reads instead")
    args = p.parse_args(argv)
    if args.status_reads:
        body = {"prompt": "a long job to poll", "num_inference_steps": 200, "height": 128, "width": 128}
        print(json.dumps(status_reads(args.base, args.concurrency, args.status_reads, body)))
        return 0
    latencies: list[float] = []
    statuses: list[str] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def worker() -> None:
        for i in counter:
            lat, status = one(args.base, {"prompt": f"load test {i}", "seed": i}, args.poll)
            with lock:
                latencies.append(lat)
                statuses.append(status)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "requests": args.requests,
                "completed": statuses.count("completed"),
                "wall_s": round(wall, 3),
                "videos_per_minute": round(60 * statuses.count("completed") / wall, 2),
                "p50_s": round(float(np.percentile(lat, 50)), 3),
                "p99_s": round(float(np.percentile(lat, 99)), 3),
            }
        )
    )
    return 0 if statuses.count("completed") == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())

"""A real Prometheus scrapes a running bulk job and a running Serve app."""

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import free_port

from kinoray.models.config import KinorayConfig
from kinoray.models.telemetry import METRICS

pytestmark = pytest.mark.integration

RAY_METRICS_PORT = free_port()
RAY_INIT = {"_metrics_export_port": RAY_METRICS_PORT}
# Workers report to the node's exporter every second instead of every ten.
RAY_ENV = {"RAY_metrics_report_interval_ms": "1000"}

PROMETHEUS = shutil.which("prometheus")
ROWS = 24
STEPS = 40
ONLINE = 4


@pytest.fixture(scope="module")
def ports():
    return {"ray": RAY_METRICS_PORT, "job": free_port(), "prom": free_port(), "http": free_port()}


@pytest.fixture(scope="module")
def prometheus(ports, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip(
            "the prometheus server is not installed (Debian package 'prometheus'; .ci/run installs it)"
        )
    tmp = tmp_path_factory.mktemp("prom")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{ports['ray']}"]}]},
            {"job_name": "kinoray-batch", "static_configs": [{"targets": [f"127.0.0.1:{ports['job']}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prom']}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{ports['prom']}"
    for _ in range(100):
        try:
            if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    return ray_session


def query(prom, expr):
    res = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert res["status"] == "success", res
    return res["data"]["result"]


def value(prom, expr):
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def wait_for(pred, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    return pred()


def test_prometheus_sees_bulk_and_online_work(prometheus, ray_cluster, ports, tmp_path):
    import openai
    from ray import serve

    from kinoray.deployments.app import build
    from kinoray.pipelines.job import run_job

    prompts = tmp_path / "p.jsonl"
    # Enough denoising that videos arrive over several seconds, not in one scrape interval.
    row = {"num_inference_steps": STEPS, "height": 96, "width": 96}
    prompts.write_text("".join(json.dumps({"prompt": f"metrics {i}", **row}) + "\n" for i in range(ROWS)))
    config = KinorayConfig.model_validate(
        {
            "batch": {"metrics_port": ports["job"]},
            "denoiser": {"batch_size": 1},
            "encoder": {"batch_size": 2},
            "decoder": {"batch_size": 1},
        }
    )
    result = {}
    job = threading.Thread(
        target=lambda: result.update(s=run_job(str(prompts), str(tmp_path / "out"), config, progress=False))
    )
    job.start()
    # While the job runs: its driver's progress and the stages' throughput are both visible.
    seen = {}

    def scraped():
        rate = value(prometheus, "sum(rate(ray_kinoray_videos_total[30s]))")
        planned = value(prometheus, 'kinoray_job_rows_planned{job="kinoray-batch"}')
        if rate:
            seen["rate"] = rate
        if planned is not None:
            seen["planned"] = planned
        if not job.is_alive():
            seen.setdefault("ended", time.time())
        return len(seen.keys() - {"ended"}) == 2 or time.time() - seen.get("ended", time.time()) > 20

    wait_for(scraped, timeout=180)
    job.join()
    assert result["s"].ok == ROWS
    assert seen.get("rate", 0) > 0, "rate(ray_kinoray_videos_total) never went above zero during the job"
    assert seen.get("planned") == ROWS

    # Online: the same stages behind Serve.
    serve.start(http_options={"host": "127.0.0.1", "port": ports["http"]})
    serve.run(
        build(KinorayConfig.model_validate({"serve": {"storage": str(tmp_path / "store")}})), name="kinoray"
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key="x", max_retries=0)
    ids = [client.videos.create(prompt=f"online {i}", extra_body={"seed": i}).id for i in range(ONLINE)]
    for vid in ids:
        assert wait_for(lambda vid=vid: client.videos.retrieve(vid).status == "completed", timeout=120)

    # Histogram counts equal the work done: one observation per row per stage.
    for stage in ("encode", "denoise", "decode"):
        expr = f'sum(ray_kinoray_stage_latency_seconds_count{{stage="{stage}"}})'
        assert wait_for(lambda expr=expr: value(prometheus, expr) == ROWS + ONLINE, timeout=60), (
            stage,
            value(prometheus, expr),
        )
    assert wait_for(lambda: value(prometheus, 'sum(ray_kinoray_videos_total{frontend="online"})') == ONLINE)
    assert value(prometheus, 'sum(ray_kinoray_videos_total{frontend="bulk"})') == ROWS
    assert value(prometheus, 'sum(ray_kinoray_stage_latency_seconds_count{stage="write"})') == ROWS
    steps = value(prometheus, "sum(ray_kinoray_denoise_steps_total)")
    assert steps == ROWS * STEPS + ONLINE * 4
    # Serve's own metrics that the dashboard builds on are really exported.
    for name in sorted(SERVE_METRICS):
        assert wait_for(lambda name=name: query(prometheus, name), timeout=30), name
    serve.shutdown()


def exported_names():
    names = {
        "kinoray_job_rows_total",
        "kinoray_job_rows_planned",
        "kinoray_job_rows_remaining",
        "kinoray_job_videos_per_minute",
    }
    for name, (kind, *_rest) in METRICS.items():
        if kind == "histogram":
            names |= {f"ray_{name}_bucket", f"ray_{name}_count", f"ray_{name}_sum"}
        else:
            names.add(f"ray_{name}")
    return names


SERVE_METRICS = {"ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries"}


def test_dashboard_queries_name_only_exported_metrics():
    import re

    path = Path(__file__).resolve().parents[1] / "k8s" / "base" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    allowed = exported_names() | SERVE_METRICS
    functions = {
        "sum",
        "rate",
        "histogram_quantile",
        "by",
        "increase",
        "max",
        "avg",
        "le",
        "stage",
        "frontend",
        "status",
        "deployment",
        "reason",
        "count",
        "clamp_min",
        "plan",
        "lora",
    }
    for expr in exprs:
        names = {
            n
            for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r'"[^"]*"', "", expr))
            if n not in functions
        }
        metric_names = {n for n in names if n.startswith(("ray_", "kinoray_"))}
        assert metric_names, expr
        assert metric_names <= allowed, (expr, metric_names - allowed)

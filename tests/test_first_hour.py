"""What a new user meets first: one-line errors for ordinary mistakes, a quiet bulk run, the
metrics port, help that gives defaults."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import free_port


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def kinoray(*args, cwd=None, env=None, timeout=300):
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "kinoray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return res, time.perf_counter() - start


def write(path, text):
    path.write_text(text)
    return str(path)


MISTAKES = {
    "unknown config key": (
        lambda d: ["generate", "a fox", "--config", write(d / "c.yaml", "decoder: {tile_sise: 64}\n")],
        "unknown key 'decoder.tile_sise' (known: ",
    ),
    "bad fault setting": (
        lambda d: ["generate", "a fox", "--config", write(d / "c.yaml", "decoder: {testing_oom: every=x}\n")],
        "every must be a whole number of calls",
    ),
    "missing config file": (
        lambda d: ["generate", "a fox", "--config", str(d / "nope.yaml")],
        "nope.yaml: No such file or directory",
    ),
    "config that is a folder": (
        lambda d: ["batch", "p.jsonl", "-o", "out", "--config", str(d)],
        "config file",
    ),
    "config that is not YAML": (
        lambda d: ["generate", "a fox", "--config", write(d / "c.yaml", "model: [tiny-wan\n")],
        "not valid YAML (line 2)",
    ),
    "unknown preset": (
        lambda d: ["generate", "a fox", "--model", "tiny-foo"],
        "--model: 'tiny-foo' is not a preset (bench-wan, shapes-wan, shapes-wan-ti2v, tiny-cogvideox",
    ),
    "hub id offline and not cached": (
        lambda d: ["generate", "a fox", "--model", "someone/no-such-model"],
        "not in the local cache",
    ),
    "frames and file name disagree": (
        lambda d: ["generate", "a fox", "--num-frames", "1", "-o", str(d / "x.mp4")],
        "--output: 1 frame(s) are written as .png, so name it",
    ),
    "a flag that is not a number": (
        lambda d: ["generate", "a fox", "--height", "abc"],
        "argument --height: invalid int value: 'abc' (see: kinoray generate --help)",
    ),
    "a number that is not finite": (
        lambda d: ["generate", "a fox", "--guidance-scale", "nan"],
        "argument --guidance-scale: must be a finite number (got nan)",
    ),
    "a strip that is not an image file": (
        lambda d: ["eval", "--strip", str(d / "s.txt")],
        "s.txt: not an image file name",
    ),
    "a size the model cannot take": (
        lambda d: ["generate", "a fox", "--height", "100"],
        "height: must be a multiple of 16",
    ),
    "a model folder that is not there": (
        lambda d: ["generate", "a fox", "--model", "./no-such-model"],
        "--model: no such folder: ./no-such-model",
    ),
    "a folder that is not a pipeline": (
        lambda d: ["generate", "a fox", "--model", str(d)],
        "is not a diffusers pipeline folder (it has no model_index.json)",
    ),
    "an unknown device": (
        lambda d: ["generate", "a fox", "--device", "tpu"],
        "--device: unknown device 'tpu'",
    ),
    "an output folder that is not there": (
        lambda d: ["generate", "a fox", "-o", str(d / "missing" / "x.mp4")],
        "--output " + "",
    ),
    "an output that is a folder": (
        lambda d: ["generate", "a fox", "-o", str(d)],
        "is a folder; give a file name",
    ),
    "a bulk output that is a file": (
        lambda d: ["batch", write(d / "p.jsonl", '{"prompt": "x"}\n'), "-o", write(d / "out.txt", "")],
        "is a file, not a folder",
    ),
    "an image for a text-to-video model": (
        lambda d: ["generate", "a fox", "--image", write(d / "f.png", "")],
        "image: this model does not take a reference image",
    ),
    "an empty reference image": (
        lambda d: ["generate", "a fox", "--model", "shapes-wan-ti2v", "--image", " "],
        "image: is empty; leave it out",
    ),
    "a reference image that is not there": (
        lambda d: ["generate", "a fox", "--model", "shapes-wan-ti2v", "--image", str(d / "f.png")],
        "image: no such file: ",
    ),
    "a prompt table that is not there": (
        lambda d: ["batch", str(d / "p.jsonl"), "-o", str(d / "o")],
        "p.jsonl",
    ),
    "a number of CPUs below one": (
        lambda d: ["batch", "p.jsonl", "-o", "o", "--num-cpus", "0"],
        "argument --num-cpus: must be at least 1 (got 0)",
    ),
    "a local cluster's size for a cluster given by address": (
        lambda d: ["batch", "p.jsonl", "-o", "o", "--num-cpus", "4", "--address", "127.0.0.1:1"],
        "--num-cpus: sizes a local cluster; a cluster given with --address or RAY_ADDRESS has its own",
    ),
    "an address where no cluster runs": (
        lambda d: [
            "batch",
            write(d / "p.jsonl", '{"prompt": "x"}\n'),
            "-o",
            str(d / "o"),
            "--address",
            f"127.0.0.1:{free_port()}",
        ],
        ": no cluster answers there (Connection refused); start one with `ray start --head`",
    ),
    "Ray's own resource among the custom ones": (
        lambda d: [
            "batch",
            "p.jsonl",
            "-o",
            "o",
            "--config",
            write(d / "c.yaml", "denoiser: {resources: {GPU: 1}}\n"),
        ],
        "denoiser.resources: 'GPU' is one of Ray's own resources, not a custom one; use num_gpus",
    ),
    "fewer CPUs than the stage pools need": (
        lambda d: ["batch", write(d / "p.jsonl", '{"prompt": "x"}\n'), "-o", str(d / "o"), "--num-cpus", "2"],
        "--num-cpus 2: the stage pools need 4 CPU (encoder.num_cpus 1, denoiser.num_cpus 1, "
        "decoder.num_cpus 1, readers and writers 1) and the cluster has 2; give at least 4, or lower the stage "
        "settings named",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_one_error_line_and_exit_2(mistake, tmp_path):
    make_args, expected = MISTAKES[mistake]
    res, seconds = kinoray(*make_args(tmp_path), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert expected in lines[0]
    assert "Traceback" not in res.stderr
    assert seconds < 2.0, f"{mistake} took {seconds:.1f}s"


@pytest.mark.integration
@pytest.mark.parametrize("command", ["batch", "serve"])
def test_stages_the_machine_cannot_hold_are_an_error_not_a_wait(command, tmp_path):
    """A stage asking for more GPUs than the machine has: Ray would keep its pool pending forever."""
    config = write(tmp_path / "c.yaml", f"denoiser: {{num_gpus: 1000}}\nserve: {{port: {free_port()}}}\n")
    args = (
        ["batch", write(tmp_path / "p.jsonl", '{"prompt": "x"}\n'), "-o", "out"] if command == "batch" else []
    )
    res, seconds = kinoray(*(args or ["serve"]), "--config", config, cwd=tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith(
        "error: the stage pools need 1000 GPU (denoiser.num_gpus 1000) and the cluster has "
    )
    assert errors[0].endswith(": lower the stage settings named, or use a cluster that has them")
    assert "Traceback" not in res.stderr
    assert seconds < 20


def test_debug_shows_the_traceback(tmp_path):
    res, _ = kinoray("generate", "a fox", "--config", str(tmp_path / "nope.yaml"), "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_ctrl_c_during_generate_is_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kinoray.cli",
            "generate",
            "a fox",
            "-o",
            "f.mp4",
            "--num-inference-steps",
            "200",
            "--height",
            "128",
            "--width",
            "128",
            "--num-frames",
            "33",
        ],  # fmt: skip
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["kinoray: interrupted"]


def test_help_gives_every_flag_a_meaning_and_a_default():
    res, _ = kinoray("generate", "--help")
    text = " ".join(res.stdout.split())
    for flag in ("--num-frames", "--height", "--num-inference-steps", "--seed", "--model", "--config"):
        assert flag in text
    assert "(default: the model's; 9 for shapes-wan)" in text  # --num-frames
    assert "(default: the model's; 64 for shapes-wan)" in text  # --height
    assert "what to generate" in text


@pytest.mark.integration
def test_a_bulk_run_is_quiet_and_exports_metrics_on_the_configured_port(tmp_path):
    port = free_port()
    config = write(tmp_path / "c.yaml", f"ray: {{metrics_export_port: {port}}}\n")
    rows = [{"prompt": f"clip {i}", "seed": i, "num_inference_steps": 2} for i in range(4)]
    prompts = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    series = []

    def scrape():
        deadline = time.time() + 120
        while time.time() < deadline and not series:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                series.extend(line for line in text.splitlines() if line.startswith("ray_kinoray_"))
            except requests.ConnectionError:
                pass
            time.sleep(0.5)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    res, _ = kinoray(
        "batch", prompts, "-o", str(tmp_path / "out"), "--config", config,
        env={"RAY_metrics_report_interval_ms": "500"},
    )  # fmt: skip
    scraper.join()
    assert res.returncode == 0, res.stderr
    assert "rows: 4 ok" in res.stdout
    assert series, "no ray_kinoray_* series on the configured metrics port"
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0] == f"kinoray: local Ray cluster, Ray metrics on http://127.0.0.1:{port}/metrics"
    # The rest is the progress bar only: no Ray log line, no warning.
    assert all(line.startswith("kinoray: ") for line in lines), lines
    for noise in ("core_worker", "WARNING", "Warning", "INFO"):
        assert noise not in res.stderr
    # The command ends without Ray's one-process-at-a-time shutdown; its cluster still goes,
    # metrics agent (which holds the port) included.
    deadline = time.time() + 15
    while time.time() < deadline and listening(port):
        time.sleep(0.2)
    assert not listening(port), "the finished run's Ray processes still serve the metrics port"


@pytest.mark.integration
def test_serve_run_with_the_example_serve_config_comes_up_on_two_cpus(tmp_path):
    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "examples" / "serve-app.yaml").read_text())
    port, gcs = free_port(), free_port()
    config["http_options"]["port"] = port
    (tmp_path / "serve-app.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).parent / "ray")
    # A cluster of exactly two CPUs, as on a 2-core machine, whatever this machine has.
    subprocess.run(
        [ray, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false"],
        env=env, check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", "--address", f"127.0.0.1:{gcs}", "serve-app.yaml"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, health = time.time() + 120, None
        while time.time() < deadline and serve.poll() is None:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                if answer.status_code != 200:  # the proxy is up, the app not yet
                    time.sleep(1)
                    continue
                health = answer.json()
                videos = requests.post(
                    f"http://127.0.0.1:{port}/v1/videos", json={"prompt": "a fox"}, timeout=10
                ).json()
                break
            except (requests.ConnectionError, requests.Timeout):  # starting, or queued until it is
                time.sleep(1)
        assert health == {"status": "ok", "model": "shapes-wan", "jobs_in_flight": 0}, serve.poll()
        assert videos["status"] == "queued"
        while videos["status"] not in ("completed", "failed") and time.time() < deadline:
            time.sleep(0.5)
            videos = requests.get(f"http://127.0.0.1:{port}/v1/videos/{videos['id']}", timeout=10).json()
        assert videos["status"] == "completed"
    finally:
        # Stopped at once rather than gracefully (a slow shutdown is not what this test is
        # about); never left behind: later modules would join the cluster.
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
        serve.kill()
        serve.wait(timeout=15)

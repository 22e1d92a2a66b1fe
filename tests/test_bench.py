"""`kinoray bench` runs on every kind of family (here an image family, whose pipelines take no
frame count), through the adapters' own knowledge of their pipelines' arguments."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_runs_on_an_image_family(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kinoray.cli",
            "bench",
            "--rows",
            "4",
            "--model",
            "tiny-sd3",
            "--online-requests",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["videos"] for r in result["runs"]] == [4, 4, 4]
    assert sorted(p.suffix for p in (tmp_path / "videos" / "a").iterdir()) == [".png"] * 4

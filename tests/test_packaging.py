"""kinoray installs one import name, `kinoray`, and works beside a user's own `models` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

from kinoray.models.video import probe_video

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_kinoray_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("kinoray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"kinoray", wheel.name.split("-py3")[0] + ".dist-info"}
    # The subpackages travel inside it, as real files.
    assert {"kinoray/models/request.py", "kinoray/pipelines/job.py", "kinoray/deployments/app.py"} <= set(
        names
    )
    # ... and so does the shipped default model, every file its checksums list.
    shipped = (ROOT / "models" / "weights" / "shapes-wan" / "SHA256SUMS").read_text().splitlines()
    for line in shipped + ["x  SHA256SUMS"]:
        assert f"kinoray/models/weights/shapes-wan/{line.split('  ', 1)[1]}" in names


def test_generate_beside_a_users_own_models_package(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "config.py").write_text("raise ImportError('the user\\'s own models package')\n")
    res = subprocess.run(
        [sys.executable, "-m", "kinoray.cli", "generate", "a fox", "-o", "fox.mp4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert probe_video((tmp_path / "fox.mp4").read_bytes())["frames"] == 9


def test_the_public_face_imports_lazily():
    code = (
        "import sys, kinoray\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules\n"
        "from kinoray import KinorayConfig, LocalPipeline, run_job, build_app\n"
        "print(kinoray.__version__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() != "0+unknown"

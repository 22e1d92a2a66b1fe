"""`kinoray generate` writes playable files with the requested frames, size and fps."""

import subprocess
import sys

from PIL import Image

from kinoray.models.video import probe_video


def kinoray(*args):
    return subprocess.run(
        [sys.executable, "-m", "kinoray.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_writes_an_h264_mp4(tmp_path):
    out = tmp_path / "fox.mp4"
    res = kinoray("generate", "a fox", "-o", str(out), "--num-frames", "13", "--fps", "12", "--width", "48")
    assert res.returncode == 0, res.stderr
    assert probe_video(out.read_bytes()) == {
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "width": 48,
        "height": 64,
        "frames": 13,
        "fps": 12.0,
    }
    assert '"output"' in res.stdout


def test_generate_one_frame_writes_a_png_and_cogvideox_works(tmp_path):
    out = tmp_path / "still.png"
    res = kinoray("generate", "a still", "-o", str(out), "--num-frames", "1", "--model", "tiny-cogvideox")
    assert res.returncode == 0, res.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 64)


def test_generate_rejects_a_bad_request_with_the_field_named(tmp_path):
    res = kinoray("generate", "a fox", "-o", str(tmp_path / "x.mp4"), "--height", "100")
    assert res.returncode == 2
    assert "height: must be a multiple of 16" in res.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_model_flag_wins_over_a_bad_kinoray_model_in_the_shell(tmp_path, monkeypatch):
    from kinoray.cli import main

    monkeypatch.setenv("KINORAY_MODEL", "tiny-nope")
    out = tmp_path / "x.mp4"
    assert main(["generate", "a fox", "--model", "tiny-wan", "--steps", "1", "-o", str(out)]) == 0
    assert probe_video(out.read_bytes())["frames"] == 9

"""Prompt tables in every format give the same requests; a bad file fails at once."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kinoray.models.config import KinorayConfig
from kinoray.pipelines.job import plan_rows
from kinoray.pipelines.table import InputError, read_prompt_table

ROWS = [
    {"id": "a", "prompt": "a fox", "seed": 1, "height": 32},
    {"id": "b", "prompt": "a boat", "negative_prompt": "blurry", "num_frames": 5, "guidance_scale": 3.5},
    {"prompt": "no id here", "fps": 12},
]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        cols = ["id", "prompt", "negative_prompt", "seed", "height", "num_frames", "guidance_scale", "fps"]
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows]), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_format_gives_the_same_requests(tmp_path, fmt):
    config = KinorayConfig()
    expected, failed, _ = plan_rows(ROWS, config, set())
    assert not failed
    url = write(tmp_path / f"p.{fmt}", ROWS, fmt)
    got, failed, _ = plan_rows(read_prompt_table(url), config, set())
    assert not failed
    assert got == expected
    by_id = {r["id"]: r for r in got}
    assert by_id["a"]["height"] == 32 and by_id["a"]["width"] == 64
    assert by_id["b"]["negative_prompt"] == "blurry" and by_id["b"]["guidance_scale"] == 3.5
    assert len([i for i in by_id if i not in ("a", "b")]) == 1  # the id-less row got a digest id


def test_memory_url_and_gzip(tmp_path):
    import gzip

    import fsspec

    with fsspec.open("memory://tables/p.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"prompt": "from memory"}\n'))
    assert read_prompt_table("memory://tables/p.jsonl.gz") == [{"prompt": "from memory"}]


def test_bad_rows_are_rows_not_file_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\nnot json\n[1, 2]\n{"prompt": 7}\n{"prompt": "big", "height": 99999}\n')
    todo, failed, _ = plan_rows(read_prompt_table(str(p)), KinorayConfig(), set())
    assert [r["prompt"] for r in todo] == ["ok"]
    errors = {f["row"]: f["error"] for f in failed}
    assert "line 2: not a JSON object" in errors[1]
    assert "line 3: not a JSON object" in errors[2]
    assert "prompt" in errors[3] and "string" in errors[3]
    assert "height" in errors[4]
    assert all(f["status"] == "failed" and f["id"] == f"row-{f['row']}" for f in failed)


def test_duplicate_ids_fail_the_later_row():
    rows = [{"id": "x", "prompt": "one"}, {"id": "x", "prompt": "two"}]
    todo, failed, _ = plan_rows(rows, KinorayConfig(), set())
    assert [r["prompt"] for r in todo] == ["one"]
    assert failed[0]["row"] == 1 and "duplicate id 'x'" in failed[0]["error"]


def test_done_rows_are_skipped():
    rows = [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"}]
    todo, failed, skipped = plan_rows(rows, KinorayConfig(), {"x"})
    assert [r["id"] for r in todo] == ["y"] and skipped == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "no such file"),
        ("p.txt", "prompt\nhi\n", "unknown prompt table format"),
        ("p.csv", "text,seed\nhi,1\n", "no 'prompt' column"),
        ("p.jsonl", '{"text": "hi"}\n', "no 'prompt' column"),
        ("p.csv", "prompt,colour\nhi,red\n", "unknown column(s) colour"),
        ("p.csv", "prompt\n", "no rows"),
        ("p.parquet", "this is not parquet", "cannot read as parquet"),
        ("p.csv", b"prompt\n\xff\xfe bad\n", "cannot read as csv"),
    ],
)
def test_bad_files_fail_with_a_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_table(str(path))


def test_cli_reports_a_bad_file_before_loading_any_model(tmp_path):
    import subprocess
    import sys

    (tmp_path / "p.csv").write_text("text\nhi\n")
    res = subprocess.run(
        [sys.executable, "-m", "kinoray.cli", "batch", str(tmp_path / "p.csv"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "no 'prompt' column" in res.stderr
    assert not (tmp_path / "out").exists()

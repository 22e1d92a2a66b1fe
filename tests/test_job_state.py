"""Validation and claiming without Ray: every row is decided once, in input order; identity,
duplicates, collisions and resume follow the manifest's contract."""

import json
import math

import pyarrow as pa
import pytest

from kinoray.models.config import KinorayConfig
from kinoray.models.video import encode_video
from kinoray.pipelines import manifest
from kinoray.pipelines.sources import ROW_SCHEMA
from kinoray.pipelines.state import JobState, video_name
from kinoray.pipelines.validate import validate_rows

BUILDER = KinorayConfig().request_builder()
FILES = ["t.jsonl"]


def raw_block(rows, file=0):
    items = [(json.dumps(r), None) if isinstance(r, dict) else (None, r) for r in rows]
    return pa.table(
        {
            "_file": pa.array([file] * len(rows), pa.int32()),
            "_row": pa.array(range(len(rows)), pa.int64()),
            "_raw": pa.array([i[0] for i in items], pa.string()),
            "_error": pa.array([i[1] for i in items], pa.string()),
        },
        schema=ROW_SCHEMA,
    )


def claim(state, rows, file=0):
    """What the claim step (claim_rows) does: decide, record the rows not generated, return the rows to generate."""
    block = validate_rows(raw_block(rows, file), BUILDER, state.files, [])
    keep, changes, _resume = state.claim(block)
    decided = block.take(pa.array(list(changes), pa.int64())).to_pylist()
    state.add([{**row, **c} for row, c in zip(decided, changes.values())])
    return block.filter(keep).to_pylist()


def written(output):
    return {(r["file"], r["row"]): r for r in manifest.read(output).to_pylist()}


def test_one_prompt_two_seeds_is_two_requests_and_two_ids_are_two_takes(tmp_path):
    state = JobState(str(tmp_path), "r1", FILES)
    todo = claim(
        state,
        [
            {"prompt": "a fox", "seed": 1},
            {"prompt": "a fox", "seed": 2},
            {"id": "take-a", "prompt": "a fox"},
            {"id": "take-b", "prompt": "a fox"},
        ],
    )
    assert len(todo) == 4 and len({r["id"] for r in todo}) == 4
    assert todo[2]["seed"] != todo[3]["seed"]


def test_identical_rows_without_ids_share_one_output(tmp_path):
    state = JobState(str(tmp_path), "r1", FILES)
    todo = claim(state, [{"prompt": "same"}, {"prompt": "same"}])
    assert len(todo) == 1
    state.finish()
    rows = written(str(tmp_path))
    dup = rows[("t.jsonl", 1)]
    assert dup["status"] == "ok" and dup["id"] == todo[0]["id"]
    assert dup["output"].endswith(video_name(todo[0]["id"], todo[0]["num_frames"]))


def test_a_colliding_explicit_id_fails_naming_the_earlier_row(tmp_path):
    state = JobState(str(tmp_path), "r1", ["a.jsonl", "b.jsonl"])
    assert len(claim(state, [{"id": "x", "prompt": "one"}], file=0)) == 1
    assert claim(state, [{"id": "x", "prompt": "two"}, {"id": "x", "prompt": "one"}], file=1) == []
    state.finish()
    rows = written(str(tmp_path))
    collided = rows[("b.jsonl", 0)]
    assert collided["status"] == "failed" and collided["error_reason"] == "duplicate_id"
    assert "row 0 of a.jsonl" in collided["error"]
    assert rows[("b.jsonl", 1)]["status"] == "ok"  # same id, same content: the same request


@pytest.mark.parametrize(
    "value, field",
    [
        ({"prompt": "a cat \ud83d then text"}, "prompt"),
        ({"prompt": "x", "height": math.inf}, "height"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "width": {"nested": 1}}, "width"),
        ({"prompt": ["a", "list"]}, "prompt"),
        ({"prompt": "x", "guidance_scale": "loud"}, "guidance_scale"),
        ({"prompt": "x", "num_frames": True}, "num_frames"),
    ],
)
def test_hostile_values_fail_their_row_naming_the_field(tmp_path, value, field):
    state = JobState(str(tmp_path), "r1", FILES)
    assert claim(state, [value, {"prompt": "fine"}]) and len(claim(state, [{"prompt": "fine 2"}])) == 1
    state.finish()
    row = written(str(tmp_path))[("t.jsonl", 0)]
    assert row["status"] == "failed" and row["error_reason"] == "invalid_request"
    assert row["error"].startswith(f"{field}:"), row["error"]


def test_done_rows_are_skipped_and_keep_their_record(tmp_path):
    out = str(tmp_path)
    first = JobState(out, "r1", FILES)
    (todo,) = claim(first, [{"id": "x", "prompt": "one"}])
    path = manifest.join(out, "videos", "x.mp4")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "x.mp4").write_bytes(b"video")
    first.record(
        pa.Table.from_pylist(
            [{**todo, "status": "ok", "output": path, "run": "r1", "denoise_s": 1.5}], schema=first.schema
        )
    )
    first.finish()
    second = JobState(out, "r2", FILES)
    assert claim(second, [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"}])[0]["id"] == "y"
    assert claim(JobState(out, "r3", FILES), [{"id": "x", "prompt": "edited"}])[0]["prompt"] == "edited"
    second.finish()
    kept = [r for r in manifest.read(out, run="r2").to_pylist() if r["id"] == "x"][0]
    assert (kept["status"], kept["run"], kept["denoise_s"]) == ("ok", "r1", 1.5)


def test_a_video_written_but_not_recorded_is_trusted_by_its_tag(tmp_path):
    import numpy as np

    out = str(tmp_path)
    req = BUILDER.build({"id": "v", "prompt": "recorded late"})
    (tmp_path / "videos").mkdir()
    frames = np.zeros((9, 64, 64, 3), np.uint8)
    (tmp_path / "videos" / "v.mp4").write_bytes(encode_video(frames, 8, tag=BUILDER.digest(req)))
    state = JobState(out, "r1", FILES)
    assert claim(state, [{"id": "v", "prompt": "recorded late"}]) == []
    assert len(claim(state, [{"id": "w", "prompt": "other"}])) == 1
    (tmp_path / "videos" / "v.mp4").write_bytes(encode_video(frames, 8, tag="another request"))
    assert len(claim(JobState(out, "r2", FILES), [{"id": "v", "prompt": "recorded late"}])) == 1


def test_a_dry_run_writes_nothing(tmp_path):
    state = JobState(str(tmp_path), "r1", FILES, dry_run=True)
    claim(state, [{"prompt": "x"}, {"prompt": "bad", "height": 100}])
    counts = state.finish()
    assert (counts["to_generate"], counts["failed"]) == (1, 1)
    assert not (tmp_path / "manifest").exists()

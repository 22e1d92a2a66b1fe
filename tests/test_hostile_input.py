"""Property-based tests: no input makes validation or the table reader do anything but accept or
reject with a clear error; no row is ever lost."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinoray.models.request import REQUEST_COLUMNS, RequestBuilder, RequestError, RequestLimits
from kinoray.pipelines.sources import InputError, _block, _iter_rows, resolve
from kinoray.pipelines.state import JobState
from kinoray.pipelines.validate import validate_rows

LIMITS = RequestLimits()
BUILDER = RequestBuilder(
    {"height": 64, "width": 64, "num_frames": 9, "fps": 8, "num_inference_steps": 4, "guidance_scale": 5.0},
    LIMITS,
)
FIELDS = [*REQUEST_COLUMNS, "extra"]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))
def test_build_request_accepts_or_raises_request_error(raw):
    try:
        req = BUILDER.build(raw)
    except RequestError as exc:
        assert str(exc)
        return
    # Whatever was accepted is within every limit.
    assert req.prompt.strip() and len(req.prompt) <= LIMITS.max_prompt_chars
    s = req.sampling
    assert LIMITS.min_size <= s.height <= LIMITS.max_size and s.height % LIMITS.size_multiple == 0
    assert (s.num_frames - 1) % LIMITS.frame_step == 0 and 1 <= s.num_frames <= LIMITS.max_frames
    assert 1 <= s.num_inference_steps <= LIMITS.max_steps
    assert "/" not in req.id and ".." not in req.id.split(".")


def plan(path, tmp_path):
    """Read, validate and claim every row of the file at `path`: (rows to generate, counts)."""
    files = resolve(str(path))
    state = JobState(str(tmp_path / "out"), "r1", [f.url for f in files], dry_run=True)
    todo = read = 0
    for index, f in enumerate(files):
        rows = list(_iter_rows(f))
        read += len(rows)
        if rows:
            block = validate_rows(_block(index, rows), BUILDER, [f.url for f in files], [])
            todo += sum(state.claim(block)[0].to_pylist())
    counts = state.finish()
    # Each row read is generated, failed, or the same request as an earlier row: none is lost.
    assert todo + counts["failed"] + counts["duplicate"] == read == counts["finished"] + todo
    return todo, counts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "csv", "tsv", "json", "parquet"]))
def test_any_bytes_as_a_table_give_rows_or_input_error(tmp_path, data, fmt):
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(data)
    try:
        plan(path, tmp_path)
    except InputError as exc:
        assert str(path) in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(FIELDS[:-1]), values, max_size=6), min_size=1, max_size=6))
def test_every_jsonl_row_is_planned_or_failed_never_lost(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", **r}, default=repr) + "\n" for r in rows))
    todo, counts = plan(path, tmp_path)
    assert todo + counts["failed"] + counts["duplicate"] == len(rows)
    assert sum(counts["reasons"].values()) == counts["failed"]


def test_a_table_of_every_hostile_kind_is_all_rows(tmp_path):
    lines = [
        b'{"prompt": "good one"}',
        b'{"prompt": "a cat \\ud83d then text"}',
        b'{"prompt": "x", "height": 1e999}',
        b'{"prompt": "x", "seed": 99999999999999999999999}',
        b'{"prompt": {"nested": true}}',
        b'{"prompt": "x", "fps": "fast"}',
        b"\xff\xfe not utf-8",
        b'{"prompt": "good two"}',
    ]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    todo, counts = plan(path, tmp_path)
    assert (todo, counts["failed"]) == (2, 6)

"""Property-based tests: no input makes validation or the table reader do anything but accept or
reject with a clear error."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinoray.models.config import KinorayConfig
from kinoray.models.request import REQUEST_COLUMNS, RequestBuilder, RequestError, RequestLimits
from kinoray.pipelines.job import plan_rows
from kinoray.pipelines.table import InputError, read_prompt_table

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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_any_bytes_as_a_table_give_rows_or_input_error(tmp_path, data, fmt):
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(data)
    try:
        rows = read_prompt_table(str(path))
    except InputError as exc:
        assert str(path) in str(exc)
        return
    todo, failed, skipped = plan_rows(rows, KinorayConfig(), set())
    assert len(todo) + len(failed) + skipped == len(rows)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(FIELDS[:-1]), values, max_size=6), min_size=1, max_size=6))
def test_every_jsonl_row_is_planned_or_failed_never_lost(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", **r}, default=repr) + "\n" for r in rows))
    todo, failed, skipped = plan_rows(read_prompt_table(str(path)), KinorayConfig(), set())
    assert len(todo) + len(failed) == len(rows) and skipped == 0
    assert sorted([r["row"] for r in todo] + [f["row"] for f in failed]) == list(range(len(rows)))
    assert all(f["error"] for f in failed)

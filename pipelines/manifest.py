"""The manifest: one row per input row, kept as a folder of Parquet parts.

A row is keyed by its input position (`file`, `row`) and records the request, a digest of
everything that decides its output (`request_digest`, the model and the reference image
included), the output path, the SHA-256 of the reference image's file (`image_sha256`), the
status and timings. Parts are written while the job runs (by the job's state actor, never
the driver); where a position was written twice, the later part wins. A run that completes
compacts the parts into one holding exactly its own rows.

Statuses: `ok` (the video at `output` is this request's), `failed` (`error`, `error_stage`,
`error_reason` say why), `denoised` (the decode ran out of memory with every plan: `output` is
the saved latents, which a rerun decodes without denoising again), `duplicate` (while a run is
going: the same request as another row, which makes the one output; it takes that row's outcome
when the run completes).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kinoray.models.request import field_type, request_fields

MANIFEST_DIR = "manifest"
VIDEOS_DIR = "videos"
LATENTS_DIR = "latents"

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
# The request's own fields, typed as the request model types them.
REQUEST_SCHEMA = [pa.field(name, _ARROW[field_type(info)]) for name, info in request_fields().items()]
OUTCOME_SCHEMA = [
    pa.field("output", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_stage", pa.string()),
    pa.field("error_reason", pa.string()),
    pa.field("encode_s", pa.float64()),
    pa.field("denoise_s", pa.float64()),
    pa.field("decode_s", pa.float64()),
    pa.field("write_s", pa.float64()),
    pa.field("run", pa.string()),
]
OUTCOME_COLUMNS = [f.name for f in OUTCOME_SCHEMA]


def schema(passthrough: Sequence[str] = ()) -> pa.Schema:
    """The manifest's columns; `passthrough` columns (from the input table) are text."""
    return pa.schema(
        [
            pa.field("file", pa.string()),
            pa.field("row", pa.int64()),
            *REQUEST_SCHEMA,
            pa.field("request_digest", pa.string()),
            *(pa.field(name, pa.string()) for name in passthrough),
            *OUTCOME_SCHEMA,
        ]
    )


SCHEMA = schema()


def image_label(image: str | None) -> str | None:
    """What the manifest keeps of a row's reference image: its path or URL as given; an inline
    image (a data: URL, as Parquet bytes arrive) as its header and size, since `image_sha256`
    (and the row's digest) identify its content."""
    if not image or not image.startswith("data:"):
        return image
    header, _, payload = image.partition(",")
    if payload.startswith("... ("):  # labelled already
        return image
    size = len(payload) * 3 // 4 - payload[-2:].count("=")  # base64: 3 bytes per 4 characters
    return f"{header},... ({size} bytes)"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def to_table(rows: list[dict[str, Any]], table_schema: pa.Schema = SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in table_schema} for r in rows], schema=table_schema
    )


def write_part(output: str, table: pa.Table, run: str, seq: int) -> str:
    """Write `table` as part `seq` of `run`; a temporary name first, so a reader never sees half a file.

    Part names sort by run (runs sort by start time), then by `seq`: later parts win.
    """
    fs, root = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    fs.makedirs(root, exist_ok=True)
    name = f"part-{run}-{seq:08d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = join(root, f".tmp-{name}")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, join(root, name))
    return name


def _parts(output: str) -> tuple[Any, list[str]]:
    fs, root = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    if not fs.exists(root):
        return fs, []
    names = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    return fs, names


def _run_of(part: str) -> str:
    return part.rsplit("/", 1)[-1].split("-")[1]


def _latest_per_position(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    latest = table.group_by(["file", "row"], use_threads=False).aggregate([("_order", "max")])
    out = table.filter(pc.is_in(table["_order"], value_set=latest["_order_max"])).drop_columns(["_order"])
    return out.sort_by([("file", "ascending"), ("row", "ascending")])


def _read_parts(fs: Any, parts: list[str]) -> list[pa.Table]:
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return tables


def read(output: str, run: str | None = None) -> pa.Table:
    """The manifest's rows, one per input position (the latest written); only `run`'s when given."""
    fs, parts = _parts(output)
    if run is not None:
        parts = [p for p in parts if _run_of(p) == run]
    return _latest_per_position(_read_parts(fs, parts))


def compact(output: str, run: str) -> int:
    """Rewrite the manifest as one part holding `run`'s rows (one per input row of a completed
    run); safe to interrupt: until the old parts are gone, readers take the latest per position.
    Returns the number of rows."""
    fs, parts = _parts(output)
    table = _latest_per_position(_read_parts(fs, [p for p in parts if _run_of(p) == run]))
    new = write_part(output, table, run, 99_999_999)
    for p in parts:
        if not p.endswith(new):
            fs.rm(p)
    return table.num_rows

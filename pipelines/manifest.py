"""The manifest: one row per prompt-table row, kept as a folder of Parquet parts.

Parts are written as results stream in, so a killed job keeps every finished row; at the end of a
run the parts are compacted into one, with one row per id (the latest run's row wins).
"""

from __future__ import annotations

import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from kinoray.models.request import field_type, request_fields

MANIFEST_DIR = "manifest"
VIDEOS_DIR = "videos"

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
# The request's own fields, typed as the request model types them.
REQUEST_SCHEMA = [pa.field(name, _ARROW[field_type(info)]) for name, info in request_fields().items()]
SCHEMA = pa.schema(
    [
        REQUEST_SCHEMA[0],  # id
        ("row", pa.int64()),
        *REQUEST_SCHEMA[1:],
        ("output", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_stage", pa.string()),
        ("error_reason", pa.string()),
        ("encode_s", pa.float64()),
        ("denoise_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("write_s", pa.float64()),
        ("run", pa.string()),
    ]
)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)


def write_part(output: str, table: pa.Table, run: str) -> str:
    """Write `table` as a new part; temporary name first so a reader never sees half a file."""
    fs, root = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    fs.makedirs(root, exist_ok=True)
    name = f"part-{run}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = join(root, f".tmp-{name}")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, join(root, name))
    return name


def read(output: str) -> pa.Table:
    """All manifest rows, one per id: where a row was written twice, the later run's wins."""
    fs, root = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    if not fs.exists(root):
        return SCHEMA.empty_table()
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    if not parts:
        return SCHEMA.empty_table()
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).select(SCHEMA.names).cast(SCHEMA))
    rows = pa.concat_tables(tables).to_pylist()
    # Run ids sort by start time, so a stable sort keeps each id's latest row last.
    latest = {r["id"]: r for r in sorted(rows, key=lambda r: r["run"] or "")}
    return to_table(
        sorted(latest.values(), key=lambda r: (r["row"] if r["row"] is not None else -1, r["id"]))
    )


def compact(output: str, run: str) -> pa.Table:
    """Rewrite all parts as one; safe to interrupt (readers dedupe by id in the meantime)."""
    fs, root = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    table = read(output)
    if not fs.exists(root):
        return table
    old = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")]
    new = write_part(output, table, run)
    for p in old:
        if not p.endswith(new):
            fs.rm(p)
    return table


def done_ids(output: str) -> set[str]:
    """Ids whose manifest row is `ok` and whose video file still exists.

    Resume reads the manifest rather than Ray Data's `CheckpointConfig(id_column=...)`, which
    lacks three things a job here needs: it filters on an id column of the input file (rows
    without ids get theirs from their content, after reading), its id log is its own and does not
    notice a deleted video or manifest row, and it checkpoints whole blocks.
    """
    table = read(output)
    ok = {r["id"]: r["output"] for r in table.to_pylist() if r["status"] == "ok"}
    if not ok:
        return set()
    fs, root = fsspec.core.url_to_fs(join(output, VIDEOS_DIR))
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
    return {i for i, out in ok.items() if out and out.rsplit("/", 1)[-1] in present}

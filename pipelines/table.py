"""Prompt tables: JSONL, CSV or Parquet at any fsspec URL, read into plain row dicts.

A file that cannot be a prompt table (unreadable, unknown format, no `prompt` column, no rows)
fails at once with `InputError`. A single bad row does not: it comes back as a row whose
`_error` says what is wrong, and becomes a failed manifest row.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import fsspec
import pyarrow.parquet as pq

from kinoray.models.request import REQUEST_COLUMNS

# A table holds requests: its columns are GenerationRequest's fields.
COLUMNS = REQUEST_COLUMNS
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
ERROR_KEY = "_error"


class InputError(ValueError):
    """The prompt table as a whole cannot be used."""


def table_format(url: str) -> str:
    name = url.lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(comp)
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise InputError(f"{url}: unknown prompt table format; use .jsonl, .csv or .parquet")


def read_prompt_table(url: str) -> list[dict[str, Any]]:
    """Rows of the table, in order; unknown columns are an error of the file, not of each row."""
    fmt = table_format(url)
    try:
        if fmt == "parquet":
            with fsspec.open(url, "rb") as f:
                table = pq.read_table(f)
            names = table.column_names
            rows = table.to_pylist()
        else:
            with fsspec.open(url, "rb", compression="infer") as f:
                data = f.read()
            rows, names = _read_jsonl(data) if fmt == "jsonl" else _read_csv(data)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{url}: no such file") from exc
    except Exception as exc:
        raise InputError(f"{url}: cannot read as {fmt}: {type(exc).__name__}: {exc}") from exc
    if "prompt" not in names:
        raise InputError(f"{url}: no 'prompt' column (columns: {', '.join(names) or 'none'})")
    unknown = [c for c in names if c not in COLUMNS]
    if unknown:
        raise InputError(f"{url}: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
    if not rows:
        raise InputError(f"{url}: the table has no rows")
    return rows


def _read_jsonl(data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    names: dict[str, None] = {}
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            rows.append({ERROR_KEY: f"line {n}: not a JSON object: {exc}"})
            continue
        if not isinstance(obj, dict):
            rows.append({ERROR_KEY: f"line {n}: not a JSON object"})
            continue
        names.update(dict.fromkeys(obj))
        rows.append(obj)
    return rows, list(names)


def _read_csv(data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    text = data.decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    names = list(reader.fieldnames or [])
    rows: list[dict[str, Any]] = []
    for rec in reader:
        if None in rec:  # more cells than header columns
            rows.append(
                {
                    ERROR_KEY: f"line {reader.line_num}: {len(names) + len(rec[None])} cells, {len(names)} columns"
                }
            )
            continue
        # An empty cell is a missing value: the job's default applies.
        rows.append({k: (v if v != "" else None) for k, v in rec.items()})
    return rows, names

"""Prompt sources: the files people have, found and read the way Ray Data reads files.

A source is a file, a folder of part files (what Spark, Ray Data and pandas jobs write), a glob,
or a list of these, at any fsspec URL. `resolve` lists the files and checks each one's header
(format, a `prompt` column, no unknown columns) before anything starts: a file that cannot be a
prompt table fails at once with `InputError`. `PromptTables` is a Ray Data datasource that
streams every row of every file as raw JSON text with its file and row number; a row that
cannot be parsed comes out with an `_error` instead, and becomes a failed manifest row.

Formats, by extension (optionally compressed: .gz, .bz2, .zst, .xz):
- JSON Lines (`.jsonl`, `.ndjson`), with or without a byte-order mark, blank lines, CRLF;
- CSV (`.csv`) and TSV (`.tsv`), with or without a byte-order mark; pandas' unnamed index
  column is ignored;
- Parquet (`.parquet`, `.pq`); the index columns that pandas names in its metadata are ignored;
- JSON (`.json`): JSON Lines, an array of objects, an object holding one such array
  (`{"prompts": [...]}`), or what pandas' `DataFrame.to_json` writes (orients `columns`,
  `index`, `split`, `table`, `records`).
Rows are numbered from 0 within their file: data rows only (not a CSV header, not blank lines).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [("_file", pa.int32()), ("_row", pa.int64()), ("_raw", pa.string()), ("_error", pa.string())]
)
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
# pandas names a written index "Unnamed: 0" when read back, and leaves it unnamed when written.
PANDAS_INDEX = re.compile(r"^(|Unnamed: \d+)$")
BLOCK_ROWS = 2048
PEEK_ROWS = 100


class InputError(ValueError):
    """A prompt source that cannot be used as a whole (exit code 2)."""


@dataclass(frozen=True)
class PromptFile:
    url: str
    format: str


def table_format(url: str) -> str | None:
    """The table format of `url` by its extension, or None when it is not a prompt table."""
    name = url.lower()
    for comp in COMPRESSIONS:
        name = name.removesuffix(comp)
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def _skipped(path: str) -> bool:
    # What Spark and Ray Data skip too: _SUCCESS, _metadata, .crc checksums, hidden files.
    return any(part.startswith(("_", ".")) for part in path.split("/")[-1:])


def resolve(sources: str | Sequence[str], allowed: Sequence[str] = ()) -> list[PromptFile]:
    """The prompt tables that `sources` names, in a stable order, each checked by its header.

    `allowed` are extra column names (passthrough columns) a table may hold.
    Raises `InputError` naming the source or file that cannot be used.
    """
    files: list[PromptFile] = []
    for source in [sources] if isinstance(sources, str) else list(sources):
        files.extend(_expand(source))
    if not files:
        raise InputError(f"{sources}: no prompt tables found")
    unique = list({f.url: f for f in files}.values())
    protocols = {type(fsspec.core.url_to_fs(f.url)[0]).__name__ for f in unique}
    if len(protocols) > 1:
        raise InputError(f"{sources}: prompt tables on different filesystems; copy them to one place")
    with ThreadPoolExecutor(max_workers=min(16, len(unique))) as pool:
        has_rows = list(pool.map(lambda f: check(f, allowed), unique))
    # Empty parts are common in folders that Spark, Ray Data and pandas write: they hold no rows.
    tables = [f for f, rows in zip(unique, has_rows) if rows]
    if not tables:
        raise InputError(f"{unique[0].url if len(unique) == 1 else sources}: the table has no rows")
    return tables


def _expand(source: str) -> list[PromptFile]:
    fs, path = fsspec.core.url_to_fs(source)
    if any(ch in path for ch in "*?["):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        explicit = False
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if not _skipped(p[len(path) :].lstrip("/")))
        explicit = False
    elif fs.exists(path):
        paths, explicit = [path], True
    else:
        raise InputError(f"{source}: no such file or folder")
    found = []
    for p in paths:
        fmt = table_format(p)
        if fmt is None:
            if explicit:
                raise InputError(
                    f"{source}: unknown prompt table format; use .jsonl, .csv, .tsv, .json or .parquet"
                )
            continue  # a folder may hold other files (a README, checksums): not tables
        found.append(PromptFile(fs.unstrip_protocol(p) if "://" in source else p, fmt))
    if not found:
        raise InputError(f"{source}: no prompt tables (.jsonl, .csv, .tsv, .json, .parquet) found")
    return found


def check(file: PromptFile, allowed: Sequence[str] = ()) -> bool:
    """Refuse `file` if it cannot be a prompt table: unreadable, in another format or encoding
    than its name says, no `prompt` column, a column twice, or columns that are neither request
    fields nor `allowed`. Returns whether it has rows."""
    from kinoray.models.request import REQUEST_COLUMNS

    try:
        _sniff(file)
        names = _peek_columns(file)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{file.url}: no such file") from None
    except Exception as exc:
        raise InputError(f"{file.url}: cannot read as {file.format}: {type(exc).__name__}: {exc}") from None
    if names is None:
        return False
    if not names:  # the first rows are all unreadable or empty: each fails as its own row
        return True
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{file.url}: column(s) {', '.join(map(repr, twice))} appear more than once")
    if "prompt" not in names:
        raise InputError(f"{file.url}: no 'prompt' column (columns: {', '.join(names) or 'none'})")
    unknown = [c for c in names if c not in REQUEST_COLUMNS and c not in allowed]
    if unknown:
        raise InputError(
            f"{file.url}: unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_COLUMNS)}"
            + (f", and the passthrough columns {', '.join(allowed)}" if allowed else "")
            + " (batch.passthrough_columns carries other columns into the manifest)"
        )
    return True


def _sniff(file: PromptFile) -> None:
    """Refuse a text table whose first bytes show another format or encoding than its name says."""
    if file.format == "parquet":
        return
    with _open(file) as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        raise InputError(f"{file.url}: is a Parquet file; name it .parquet")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        kind = 'UTF-16 text (Excel\'s "Unicode text")' if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "binary"
        raise InputError(f"{file.url}: is {kind}, not UTF-8 {file.format.upper()}; save it as UTF-8")
    if file.format in ("csv", "tsv"):
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        if "prompt" in first and file.format == "csv" and ";" in first and "," not in first:
            raise InputError(
                f"{file.url}: the header is separated by ';'; save it with ',' (or as .tsv with tabs)"
            )


def _peek_columns(file: PromptFile) -> list[str] | None:
    """Column names of the first rows (None: no rows), reading as little as the format allows."""
    if file.format == "parquet":
        import pyarrow.parquet as pq

        with _open(file) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows == 0:
                return None
            return [n for n in pf.schema_arrow.names if n not in _pandas_index(pf.schema_arrow)]
    if file.format in ("csv", "tsv"):
        with _open(file) as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
            reader = csv.reader(text, delimiter="\t" if file.format == "tsv" else ",")
            header = next(reader, None)
            if header is None or next(reader, None) is None:
                return None
            return [h for i, h in enumerate(header) if not (i == 0 and PANDAS_INDEX.match(h))]
    names: dict[str, None] = {}
    seen = 0
    for _, raw, _err in _iter_rows(file, limit=PEEK_ROWS):
        seen += 1
        try:
            names.update(dict.fromkeys(parse_row(raw) if raw is not None else {}))
        except ValueError:
            continue  # a bad row is that row's error, not the file's
    return list(names) if seen else None


def _pandas_index(schema: pa.Schema) -> set[str]:
    meta = schema.pandas_metadata or {}
    return {c for c in meta.get("index_columns", []) if isinstance(c, str)}


def _iter_rows(
    file: PromptFile, f: Any = None, limit: int | None = None
) -> Iterator[tuple[int, str | None, str | None]]:
    """(row number, the row as JSON object text or None, error or None) for each data row of
    `file`, read from the open binary file `f` (opened here when None)."""
    if f is None:
        with _open(file) as opened:
            yield from _iter_rows(file, opened, limit)
        return
    if file.format == "jsonl":
        rows = _jsonl_rows(f)
    elif file.format == "json":
        rows = _json_rows(file.url, f.read())
    elif file.format in ("csv", "tsv"):
        rows = _csv_rows(f, "\t" if file.format == "tsv" else ",")
    else:
        rows = _parquet_rows(f)
    for n, item in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield (n, *item)


def _open(file: PromptFile) -> Any:
    """`file` as a binary Python file, decompressed by its extension (Parquet compresses inside)."""
    if file.format == "parquet":
        return fsspec.open(file.url, "rb").open()
    f = fsspec.open(file.url, "rb", compression="infer").open()
    # Some decompressors (zstandard's) read but do not iterate lines: buffer them.
    return f if hasattr(f, "readline") and not _is_zstd(f) else io.BufferedReader(f)


def _is_zstd(f: Any) -> bool:
    return type(f).__module__.startswith("zstandard")


# ASCII JSON keeps any text (even a lone surrogate) storable; the request check names it. One
# encoder for all rows: json.dumps with options builds a new one per call.
def _json_default(value: Any) -> str:
    # Bytes (a Parquet binary column: an image's file) travel as a data: URL (RFC 2397).
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "data:;base64," + base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


_JSON = json.JSONEncoder(ensure_ascii=True, default=_json_default, allow_nan=True)


def _dumps(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    try:
        return _JSON.encode(obj), None
    except (TypeError, ValueError) as exc:
        return None, f"cannot represent the row: {exc}"


def _jsonl_rows(f: Any) -> Iterator[tuple[str | None, str | None]]:
    # Lines pass as text: parsing them is validation's work, spread over the cluster.
    first = True
    for line in f:
        if first:
            line = line.removeprefix(b"\xef\xbb\xbf")
            first = False
        if not line.strip():
            continue
        try:
            yield line.decode("utf-8").strip(), None
        except UnicodeDecodeError as exc:
            yield None, f"not valid UTF-8: {exc}"


def parse_row(raw: str) -> dict[str, Any]:
    """A raw row (JSON text) as an object; raises ValueError saying what it is instead."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: a JSON {type(obj).__name__}")
    return obj


def _json_rows(url: str, data: bytes) -> Iterator[tuple[str | None, str | None]]:
    text = data.decode("utf-8-sig")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        # Not one JSON document: JSON Lines in a .json file.
        yield from _jsonl_rows(io.BytesIO(text.encode("utf-8")))
        return
    for obj in _records(url, doc):
        yield (
            _dumps(obj)
            if isinstance(obj, dict)
            else (None, f"not a JSON object: a JSON {type(obj).__name__}")
        )


def _records(url: str, doc: Any) -> list[Any]:
    """The rows of a JSON document, in the shapes people and pandas write; refuse others."""
    if isinstance(doc, list):
        if any(isinstance(item, dict) for item in doc):
            return doc  # rows; anything but an object among them is a row error
        kinds = sorted({type(item).__name__ for item in doc}) or ["nothing"]
        found = f"a JSON array of {', '.join(kinds)}"
    elif isinstance(doc, dict):
        if "data" in doc and isinstance(doc["data"], list) and ("schema" in doc or "columns" in doc):
            if "columns" in doc:  # orient="split"
                return [dict(zip(doc["columns"], values)) for values in doc["data"]]
            return [{k: v for k, v in r.items() if k not in _table_index(doc)} for r in doc["data"]]
        values = list(doc.values())
        if len(doc) == 1 and isinstance(values[0], list):  # {"prompts": [...]}
            return values[0]
        if values and all(isinstance(v, dict) for v in values):
            keys = list(values[0])
            if "prompt" in doc:  # orient="columns": column -> {index: value}
                return [{c: doc[c].get(k) for c in doc} for k in keys]
            return values  # orient="index": index -> row
        if "prompt" in doc:
            return [doc]  # one row
        found = f"a JSON object with keys {', '.join(map(str, list(doc)[:8]))}"
    else:
        found = f"a JSON {type(doc).__name__}"
    raise InputError(
        f"{url}: expected JSON Lines, an array of objects or a pandas to_json() table; found {found}"
    )


def _table_index(doc: dict[str, Any]) -> set[str]:
    fields = doc.get("schema", {}).get("primaryKey", [])
    return set(fields) if isinstance(fields, list) else set()


def _csv_rows(f: Any, delimiter: str) -> Iterator[tuple[str | None, str | None]]:
    # surrogateescape keeps undecodable bytes as lone surrogates: the request check names the
    # field that holds them, and the other cells of the file still read.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    skip_first = bool(header) and PANDAS_INDEX.match(header[0]) is not None
    names = header[1:] if skip_first else header
    for cells in reader:
        if not cells:
            continue
        cells = cells[1:] if skip_first else cells
        if len(cells) > len(names):
            yield None, f"{len(cells)} cells, {len(names)} columns"
            continue
        # An empty cell is a missing value: the job's default applies.
        yield _dumps({k: v for k, v in zip(names, cells) if v != ""})


def _parquet_rows(f: Any) -> Iterator[tuple[str | None, str | None]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    index = _pandas_index(pf.schema_arrow)
    columns = [n for n in pf.schema_arrow.names if n not in index]
    for batch in pf.iter_batches(batch_size=BLOCK_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield _dumps({k: v for k, v in row.items() if v is not None})


class PromptTables:
    """A Ray Data datasource over prompt files: `ray.data.read_datasource(PromptTables(...))`.

    Files are read through the same fsspec filesystem kinoray writes with. Each read task streams
    its files in blocks of `ROW_SCHEMA` rows; `on_file_read(index, rows)` (a Ray actor method)
    hears when a file has been read to its end, so the total becomes known.
    """

    def __new__(cls, files: Sequence[PromptFile], on_file_read: Any = None) -> Any:
        # Built on first use so that importing this module does not import Ray.
        return _datasource_class()(files, on_file_read)


def _datasource_class() -> type:
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.data.datasource import FileBasedDatasource

    class _PromptTables(FileBasedDatasource):
        def __init__(self, files: Sequence[PromptFile], on_file_read: Any = None):
            fs, _ = fsspec.core.url_to_fs(files[0].url)
            paths = [fsspec.core.url_to_fs(f.url)[1] for f in files]
            super().__init__(paths, filesystem=PyFileSystem(FSSpecHandler(fs)))
            self._files = {p: (i, f) for i, (p, f) in enumerate(zip(paths, files))}
            self._on_file_read = on_file_read

        def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
            # Opened as `resolve` peeked at it: through fsspec, decompressed by extension.
            return _open(self._files[path][1])

        def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
            index, file = self._files[path]
            block: list[tuple[int, str | None, str | None]] = []
            count = 0
            for item in _iter_rows(file, f):
                block.append(item)
                count += 1
                if len(block) >= BLOCK_ROWS:
                    yield _block(index, block)
                    block = []
            if block:
                yield _block(index, block)
            if self._on_file_read is not None:
                self._on_file_read.remote(index, count)

    return _PromptTables


def _block(index: int, rows: list[tuple[int, str | None, str | None]]) -> pa.Table:
    return pa.table(
        {
            "_file": pa.array([index] * len(rows), pa.int32()),
            "_row": pa.array([r[0] for r in rows], pa.int64()),
            "_raw": pa.array([r[1] for r in rows], pa.string()),
            "_error": pa.array([r[2] for r in rows], pa.string()),
        },
        schema=ROW_SCHEMA,
    )

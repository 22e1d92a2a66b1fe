"""Prompt tables as people make them: pandas, Spark-style part folders, Excel-ish CSV, JSON
shapes, compression. Each writer puts `rows` (dicts) into `folder` and returns the path."""

import bz2
import gzip
import json
import lzma

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard


def jsonl(path, rows, bom=False, crlf=False, blank=False):
    nl = "\r\n" if crlf else "\n"
    text = (nl + (nl if blank else "")).join(json.dumps(r) for r in rows) + nl
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def pandas_csv(path, rows, bom=False, sep=","):
    # pandas' defaults: the index written as an unnamed first column.
    pd.DataFrame(rows).to_csv(path, sep=sep, encoding="utf-8-sig" if bom else "utf-8")
    return path


def pandas_parquet_sorted(path, rows, by="prompt"):
    # A sort leaves a non-trivial index, which pandas stores as __index_level_0__.
    df = pd.DataFrame(rows).sort_values(by, ascending=False)
    df.to_parquet(path)
    assert "__index_level_0__" in pq.read_schema(path).names
    return path


def spark_folder(folder, rows, parts=2):
    folder.mkdir()
    for k in range(parts):
        table = pa.Table.from_pylist(rows[k::parts])
        pq.write_table(table, folder / f"part-0000{k}-6f1c2b9e-c000.snappy.parquet", compression="snappy")
        (folder / f".part-0000{k}-6f1c2b9e-c000.snappy.parquet.crc").write_bytes(b"\x00crc")
    (folder / "_SUCCESS").write_text("")
    return folder


def pandas_json(path, rows, orient):
    pd.DataFrame(rows).to_json(path, orient=orient)
    return path


def compressed(path, rows, kind):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    packed = {
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lzma.compress,
        "zst": zstandard.ZstdCompressor().compress,
    }[kind](data)
    path.write_bytes(packed)
    return path

"""Validation inside the pipeline: raw rows -> requests, or failed rows naming the field.

Runs as Ray Data tasks over the blocks the prompt source yields. Nothing a row holds (any bytes,
a lone surrogate, a non-finite number, an out-of-range integer, a nested object, a wrong type)
can fail the block: it becomes a failed row whose error names the field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from kinoray.models.request import ID_PATTERN, SAMPLING_FIELDS, RequestBuilder, RequestError
from kinoray.pipelines import manifest
from kinoray.pipelines.sources import parse_row

# The claim step needs each row's file as a number to order rows; it is not written.
FILE_INDEX = "_file"


def validated_schema(passthrough: Sequence[str]) -> pa.Schema:
    return manifest.schema(passthrough).append(pa.field(FILE_INDEX, pa.int32()))


def validate_rows(
    block: pa.Table, builder: RequestBuilder, files: Sequence[str], passthrough: Sequence[str]
) -> pa.Table:
    """Raw rows (`sources.ROW_SCHEMA`) -> manifest-shaped rows, in the same order: `status`
    "pending" with the request's columns and digest, or "failed" with the reason."""
    out = []
    for index, position, raw, error in zip(
        *(block[c].to_pylist() for c in ("_file", "_row", "_raw", "_error"))
    ):
        row: dict[str, Any] = {"file": files[index], "row": position, FILE_INDEX: index, "status": "pending"}
        obj: dict[str, Any] = {}
        reason = "unreadable_row"
        if error is None:
            try:
                obj = parse_row(raw)
            except ValueError as exc:
                error = str(exc)
        if error is None:
            for name in passthrough:
                if name in obj:
                    value = obj.pop(name)
                    row[name] = value if isinstance(value, str) and _storable(value) else json.dumps(value)
            try:
                req = builder.build(obj)
            except RequestError as exc:
                error, reason = str(exc), "invalid_request"
            else:
                row.update(req.row())
                row["request_digest"] = builder.digest(req)  # of the image as the table names it
                if req.image is not None:
                    row["image"] = resolve_image(req.image, files[index])
        if error is not None:
            raw_id, prompt, image, lora = (obj.get(k) for k in ("id", "prompt", "image", "lora"))
            if lora is not None and not isinstance(lora, str):
                lora = json.dumps(lora, default=str)  # as the table held it, for the manifest
            row.update(
                id=raw_id if isinstance(raw_id, str) and ID_PATTERN.match(raw_id) else None,
                prompt=prompt if isinstance(prompt, str) and _storable(prompt) else None,
                image=image if isinstance(image, str) and _storable(image) else None,
                lora=lora if isinstance(lora, str) and _storable(lora) else None,
                status="failed",
                error=error,
                error_stage="validate",
                error_reason=reason,
            )
        out.append(row)
    return pa.Table.from_pylist(out, schema=validated_schema(passthrough))


def resolve_image(image: str, table: str) -> str:
    """A reference image as a table names it -> one any worker can read: a relative path is
    relative to the table's folder (local or remote); URLs, data: URLs and absolute paths stay."""
    if image.startswith(("/", "~", "data:")) or "://" in image:
        return image
    return f"{table.rsplit('/', 1)[0]}/{image}" if "/" in table else image


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sampling_order(table: pa.Table) -> pa.Table:
    """Rows of equal sampling parameters and adapter set next to each other (then by position):
    buckets within a block, so the denoiser's batches stay full while the table streams."""
    names = (*SAMPLING_FIELDS, "lora")
    keys = [(name, "ascending") for name in names if table[name].null_count < table.num_rows]
    return table.sort_by([*keys, (FILE_INDEX, "ascending"), ("row", "ascending")])

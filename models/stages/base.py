"""The stage skeleton: everything a stage does besides its own computation, written once.

A batch is a dict of numpy arrays, one entry per row (Ray Data's "numpy" batch format), so a
stage is a `map_batches` callable in bulk jobs and the body of a Serve deployment online. A
concrete stage declares the columns it reads and adds, how rows group into one call, and
computes one group; `Stage.__call__` does the rest:

1. check that the declared input columns are there;
2. pass rows that failed upstream through untouched;
3. group the other rows (`group_key`) and cut groups into chunks of `max_batch_size`;
4. time each chunk and keep the in-flight gauge;
5. on an exception, retry the chunk row by row, so one bad row never fails its neighbours;
6. scatter the outputs back into rows, add `<stage>_s` (seconds per row), drop consumed columns
   (a row that failed here keeps those its stage names in `kept_on_failure`);
7. pass through rows whose `resume_stage` names a later stage: their earlier work was saved.

A failed row carries a structured error in three columns, `error` (the message, "" when the
row is fine), `error_stage` and `error_reason`; metrics are labelled by the reason.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import numpy as np

from kinoray.models import telemetry
from kinoray.models.request import LoraRef, parse_loras

Batch = dict[str, np.ndarray]
ERROR_COLUMNS = ("error", "error_stage", "error_reason")
# The model graph's stages in order; a row whose RESUME_COLUMN names one skips those before it.
STAGE_ORDER = ("encode", "denoise", "decode", "write")
RESUME_COLUMN = "resume_stage"

log = logging.getLogger(__name__)


class RowError(Exception):
    """A row that a stage could not produce, for a reason it can name.

    `reason` is a short, stable label (`invalid_input`, `out_of_memory`, `cancelled`, ...): it
    becomes a metric label, so it must not hold request data. A stage raises it, or returns it
    in place of a row's output.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    @classmethod
    def of(cls, exc: BaseException) -> RowError:
        """Any exception as a row error; its reason is the exception's class name."""
        if isinstance(exc, RowError):
            return exc
        return cls(type(exc).__name__, f"{type(exc).__name__}: {exc}")


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def scalar(value: Any) -> Any:
    """A numpy scalar as the plain Python value (what pydantic models and diffusers expect)."""
    return value.item() if isinstance(value, np.generic) else value


def reference_image(batch: Batch, i: int) -> str | None:
    """Row `i`'s reference image, or None: a column of no images may come back from Arrow as
    None or as NaN."""
    value = scalar(batch["image"][i]) if "image" in batch else None
    return value if isinstance(value, str) and value else None


def loras_of(batch: Batch, i: int) -> tuple[LoraRef, ...]:
    """Row `i`'s LoRA adapters (validated upstream; the `lora` column holds their JSON text),
    sorted by name; () without the column or for a row without adapters."""
    return parse_loras(scalar(batch["lora"][i])) if "lora" in batch else ()


def column(values: Sequence[Any]) -> np.ndarray:
    """One column from per-row values: arrays of one shape stack; anything else is an object array."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({v.shape for v in values}) == 1 and len({v.dtype for v in values}) == 1:
            return np.stack(values)
    elif values and all(isinstance(v, (bool, int, float, np.number)) for v in values):
        return np.asarray(values)
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def empty_like(value: Any) -> Any:
    """The placeholder a failed row holds in a column whose good rows hold values like `value`."""
    if isinstance(value, np.ndarray):
        return np.zeros((0,) * value.ndim, dtype=value.dtype)
    if isinstance(value, (bytes, str)):
        return type(value)()
    if isinstance(value, (bool, int, float, np.number)):
        return type(value)(0)
    return None


class Stage:
    """Base class of a stage: subclasses set `name`, declare columns and implement `compute`.

    `max_batch_size` caps rows per `compute` call (None: a whole group).
    """

    name: ClassVar[str]

    def __init__(self, max_batch_size: int | None = None):
        self.max_batch_size = max_batch_size
        # A failed row's placeholder looks like the good rows' values seen last, so that every
        # batch of a column has one type, even a batch in which every row failed.
        self._templates: dict[str, Any] = {}

    # -- what a stage declares ----------------------------------------------------------------

    def input_columns(self) -> dict[str, str]:
        """Columns this stage reads, with what each holds."""
        return {}

    def output_columns(self) -> dict[str, str]:
        """Columns this stage adds, with what each holds."""
        return {}

    def consumed_columns(self) -> tuple[str, ...]:
        """Input columns that no later stage needs (large arrays): dropped from the output."""
        return ()

    def kept_on_failure(self) -> tuple[str, ...]:
        """Consumed columns that a row failing in this stage keeps, so its work can be saved."""
        return ()

    def output_dtypes(self) -> dict[str, np.dtype]:
        """The dtype of each array output column. A row that failed holds an empty array of it:
        Ray Data can join blocks of arrays of other shapes, not arrays with nulls or arrays of
        another dtype, so a batch in which every row failed must still have typed columns."""
        return {}

    def group_key(self, batch: Batch, i: int) -> Hashable:
        """Rows with equal keys may share one `compute` call."""
        return None

    def compute(self, batch: Batch, rows: list[int], key: Hashable, **kwargs: Any) -> dict[str, list[Any]]:
        """Outputs for `rows` of `batch` (one group): each output column -> one value per row.

        A value may be a `RowError` for a row that could not be produced; raising fails the
        whole chunk, which is then retried row by row.
        """
        raise NotImplementedError

    # -- the bookkeeping ----------------------------------------------------------------------

    def __call__(self, batch: Batch, **kwargs: Any) -> Batch:
        n = batch_len(batch)
        missing = [c for c in self.input_columns() if c not in batch]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs column(s) {', '.join(missing)}; got {', '.join(batch)}"
            )
        errors = {c: _strings(batch.get(c), n) for c in ERROR_COLUMNS}
        failed_before = [bool(e) for e in errors["error"]]
        outputs: dict[str, list[Any]] = {c: [None] * n for c in self.output_columns()}
        seconds = np.full(n, np.nan)  # NaN: not computed here (failed before, or resumed later)
        resume = _strings(batch.get(RESUME_COLUMN), n)
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i in range(n):
            # A row resumed at a later stage (its earlier work is saved) passes through.
            later = (
                resume[i] in STAGE_ORDER
                and self.name in STAGE_ORDER
                and STAGE_ORDER.index(resume[i]) > STAGE_ORDER.index(self.name)
            )
            if not errors["error"][i] and not later:
                groups[self.group_key(batch, i)].append(i)
        size = self.max_batch_size
        for key, idx in groups.items():
            for start in range(0, len(idx), size or len(idx)):
                self._run(
                    batch, key, idx[start : start + (size or len(idx))], outputs, errors, seconds, kwargs
                )
        consumed = set(self.consumed_columns())
        failed_here = [bool(e) and not before for e, before in zip(errors["error"], failed_before)]
        out = {k: v for k, v in batch.items() if k not in consumed}
        # A row that failed here keeps what it came with (e.g. its latents), to be saved; the
        # column is there for every row, so that every block of this stage has the same columns.
        for name in consumed & set(self.kept_on_failure()) & set(batch):
            out[name] = column(
                [batch[name][i] if failed_here[i] else empty_like(batch[name][i]) for i in range(n)]
            )
        for name, values in outputs.items():
            template = next((v for v in values if v is not None), None)
            if template is not None:
                self._templates[name] = template
            elif name not in self._templates and name in self.output_dtypes():
                self._templates[name] = np.zeros((0,), self.output_dtypes()[name])
            placeholder = empty_like(self._templates.get(name))
            out[name] = column([placeholder if v is None else v for v in values])
        for c in ERROR_COLUMNS:
            out[c] = np.array(errors[c], dtype=object)
        out[f"{self.name}_s"] = seconds
        return out

    def _run(
        self,
        batch: Batch,
        key: Hashable,
        chunk: list[int],
        outputs: dict[str, list[Any]],
        errors: dict[str, list[str]],
        seconds: np.ndarray,
        kwargs: dict[str, Any],
    ) -> None:
        start = time.perf_counter()
        telemetry.set_gauge("kinoray_in_flight", len(chunk), stage=self.name)
        try:
            result = self.compute(batch, chunk, key, **kwargs)
        except Exception as exc:
            if len(chunk) > 1:  # isolate the row that fails rather than fail its neighbours
                for i in chunk:
                    self._run(batch, key, [i], outputs, errors, seconds, kwargs)
                return
            result = {name: [RowError.of(exc)] for name in outputs}
            if not isinstance(exc, RowError):
                log.warning(
                    "%s failed for one row: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG)
                )
        finally:
            telemetry.set_gauge("kinoray_in_flight", 0, stage=self.name)
        elapsed = time.perf_counter() - start
        reasons = []
        for k, i in enumerate(chunk):
            failure = next((v[k] for v in result.values() if isinstance(v[k], RowError)), None)
            if failure is not None:
                errors["error"][i] = failure.message or failure.reason
                errors["error_stage"][i] = self.name
                errors["error_reason"][i] = failure.reason
                reasons.append(failure.reason)
                continue
            for name in outputs:
                outputs[name][i] = result[name][k]
            seconds[i] = elapsed / len(chunk)
        telemetry.record_stage(self.name, elapsed, len(chunk), reasons)


def _strings(values: np.ndarray | None, n: int) -> list[str]:
    if values is None:
        return [""] * n
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> Batch:
    """Rows (dicts with the same keys) -> a batch of columns."""
    return {key: column([r[key] for r in rows]) for key in rows[0]} if rows else {}


def batch_to_rows(batch: Batch) -> list[dict[str, Any]]:
    """A batch of columns -> one dict of plain values (and arrays) per row."""
    return [{k: scalar(v[i]) for k, v in batch.items()} for i in range(batch_len(batch))]


class ModelStage(Stage):
    """A stage that runs one part of a model: it holds the family adapter loaded for that part.

    `model` is a `ModelSpec` (or its dict, or a weights string); tests may pass a ready
    `adapter` instead, which loads nothing.
    """

    def __init__(self, model: Any = None, *, adapter: Any = None, max_batch_size: int | None = None):
        super().__init__(max_batch_size)
        if adapter is None:
            from kinoray.models.families import load_adapter
            from kinoray.models.spec import ModelSpec

            spec = (
                model
                if isinstance(model, ModelSpec)
                else ModelSpec.model_validate({"weights": model} if isinstance(model, str) else (model or {}))
            )
            adapter = load_adapter(spec, self.name)  # type: ignore[arg-type]
        self.adapter = adapter

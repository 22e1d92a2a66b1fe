"""The three stages as callable classes over column batches.

A batch is a dict of numpy arrays, one entry per row (Ray Data's "numpy" batch format), so the
same classes are `map_batches` callables in bulk jobs and the bodies of Serve deployments
online. Only numpy arrays and plain values cross stage boundaries.

Every stage carries an `error` column: a row that failed upstream passes through untouched, and
a row that fails here gets its reason, so no row is ever dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from models import telemetry
from models.families import FamilyAdapter, Stage, load_adapter
from models.request import GenerationRequest
from models.spec import ModelSpec

Batch = dict[str, np.ndarray]
# (row ids of the group, steps done, total steps)
ProgressCallback = Callable[[list[str], int, int], None]

REQUEST_COLUMNS = tuple(GenerationRequest.model_fields)
# Rows that agree on these share one denoiser call (fps too: LTX-Video conditions on it).
SHAPE_COLUMNS = ("height", "width", "num_frames", "fps", "num_inference_steps", "guidance_scale")

log = logging.getLogger(__name__)


def as_spec(model: ModelSpec | dict[str, Any] | str | None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(weights=model)
    return ModelSpec(**(model or {}))


def requests_to_batch(requests: Sequence[GenerationRequest]) -> Batch:
    rows = [r.model_dump() for r in requests]
    batch = {c: np.array([row[c] for row in rows]) for c in REQUEST_COLUMNS}
    batch["error"] = np.array([""] * len(rows), dtype=object)
    return batch


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def object_column(values: Sequence[np.ndarray]) -> np.ndarray:
    """Stack equal-shaped arrays; otherwise an object array (a variable-shaped column)."""
    shapes = {v.shape for v in values}
    if len(shapes) == 1:
        return np.stack(values)
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _errors(batch: Batch) -> np.ndarray:
    n = batch_len(batch)
    err = batch.get("error")
    if err is None:
        return np.array([""] * n, dtype=object)
    return np.array(["" if e is None else str(e) for e in err], dtype=object)


def _groups(keys: Iterable[Hashable], ok: np.ndarray) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if ok[i]:
            groups[key].append(i)
    return groups


def _chunks(idx: list[int], size: int | None) -> list[list[int]]:
    size = size or len(idx)
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class _StageBase:
    stage: ClassVar[Stage]

    def __init__(self, model: ModelSpec | dict[str, Any] | str | None = None):
        _quiet()
        self.spec = as_spec(model)
        self.adapter: FamilyAdapter = load_adapter(self.spec, self.stage)


class TextEncoder(_StageBase):
    """Prompts -> the family's conditioning columns (`prompt_embeds`, `negative_prompt_embeds`,
    and e.g. attention masks), with an LRU cache of texts.

    A job's negative prompt (usually one text for all rows) and any repeated prompt are
    encoded once.
    """

    stage = "encode"

    def __init__(self, model: ModelSpec | dict[str, Any] | str | None = None, cache_size: int = 1024):
        super().__init__(model)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.cache_hits = 0

    def embed(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.cache_hits += len(texts) - len(missing)
        if missing:
            encoded = self.adapter.encode(missing)
            for k, text in enumerate(missing):
                self._cache[text] = {name: arr[k] for name, arr in encoded.items()}
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, batch: Batch) -> Batch:
        start = time.perf_counter()
        n = batch_len(batch)
        errors = _errors(batch)
        ok = errors == ""
        todo = [i for i in range(n) if ok[i]]
        prompts = [str(batch["prompt"][i]) for i in todo]
        negatives = [str(batch["negative_prompt"][i]) for i in todo]
        pos, neg = [None] * n, [None] * n
        telemetry.set_gauge("kinoray_in_flight", len(todo), stage="encode")
        try:
            embeds = self.embed(prompts + negatives)
            for k, i in enumerate(todo):
                pos[i], neg[i] = embeds[k], embeds[len(todo) + k]
        except Exception as exc:  # a failing batch fails its rows, not the job
            log.exception("text encoder failed")
            for i in todo:
                errors[i] = f"encode failed: {type(exc).__name__}: {exc}"
        telemetry.set_gauge("kinoray_in_flight", 0, stage="encode")
        if todo:
            telemetry.record_stage(
                "encode", time.perf_counter() - start, len(todo), [errors[i] for i in todo if errors[i]]
            )
        out = dict(batch)
        template = next((p for p in pos if p is not None), None)
        for name in self.adapter.conditioning:
            empty = np.zeros_like(template[name]) if template else np.zeros((0, 0), np.float32)
            out[name] = object_column([empty if p is None else p[name] for p in pos])
            out[f"negative_{name}"] = object_column([empty if p is None else p[name] for p in neg])
        out["error"] = errors
        out["encode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out


class Denoiser(_StageBase):
    """Embeddings + seeds -> `latents`, one diffusers call per group of rows of the same shape."""

    stage = "denoise"

    def __init__(
        self, model: ModelSpec | dict[str, Any] | str | None = None, max_batch_size: int | None = None
    ):
        super().__init__(model)
        self.max_batch_size = max_batch_size
        self.batch_sizes: list[int] = []

    def __call__(self, batch: Batch, on_step: ProgressCallback | None = None) -> Batch:
        n = batch_len(batch)
        errors = _errors(batch)
        latents: list[np.ndarray | None] = [None] * n
        seconds = np.zeros(n)
        keys = zip(*(batch[c].tolist() for c in SHAPE_COLUMNS))
        for key, idx in _groups(keys, errors == "").items():
            for chunk in _chunks(idx, self.max_batch_size):
                self._run(batch, key, chunk, latents, errors, seconds, on_step)
        template = next((x for x in latents if x is not None), None)
        empty = np.zeros((0,) * (template.ndim if template is not None else 4), np.float32)
        cond = set(self._conditioning_columns())
        out = {k: v for k, v in batch.items() if k not in cond}
        out["latents"] = object_column([empty if x is None else x for x in latents])
        out["error"] = errors
        out["denoise_s"] = seconds
        return out

    def _conditioning_columns(self) -> list[str]:
        names = self.adapter.conditioning
        return [*names, *(f"negative_{n}" for n in names)]

    def _run(
        self,
        batch: Batch,
        key: tuple[Any, ...],
        chunk: list[int],
        latents: list[np.ndarray | None],
        errors: np.ndarray,
        seconds: np.ndarray,
        on_step: ProgressCallback | None,
    ) -> None:
        height, width, num_frames, fps, steps, guidance = key
        ids = [str(batch["id"][i]) for i in chunk]
        progress = (lambda done, total: on_step(ids, done, total)) if on_step else None
        start = time.perf_counter()
        telemetry.set_gauge("kinoray_in_flight", len(chunk), stage="denoise")
        try:
            out = self.adapter.denoise(
                {c: np.stack([batch[c][i] for i in chunk]) for c in self._conditioning_columns()},
                [int(batch["seed"][i]) for i in chunk],
                int(height),
                int(width),
                int(num_frames),
                int(fps),
                int(steps),
                float(guidance),
                on_step=progress,
            )
        except Exception as exc:
            if len(chunk) > 1:  # isolate the row that fails rather than fail its neighbours
                for i in chunk:
                    self._run(batch, key, [i], latents, errors, seconds, on_step)
                return
            log.exception("denoiser failed for %s", ids)
            errors[chunk[0]] = f"denoise failed: {type(exc).__name__}: {exc}"
            telemetry.record_stage("denoise", time.perf_counter() - start, 1, [errors[chunk[0]]])
            return
        finally:
            telemetry.set_gauge("kinoray_in_flight", 0, stage="denoise")
        elapsed = time.perf_counter() - start
        self.batch_sizes.append(len(chunk))
        telemetry.record_stage("denoise", elapsed, len(chunk), [])
        telemetry.inc("kinoray_denoise_steps_total", int(steps) * len(chunk))
        share = elapsed / len(chunk)
        for k, i in enumerate(chunk):
            latents[i] = out[k]
            seconds[i] = share


class Decoder(_StageBase):
    """Latents -> `frames`, uint8 (T, H, W, 3) per row."""

    stage = "decode"

    def __init__(
        self, model: ModelSpec | dict[str, Any] | str | None = None, max_batch_size: int | None = None
    ):
        super().__init__(model)
        self.max_batch_size = max_batch_size

    def __call__(self, batch: Batch) -> Batch:
        n = batch_len(batch)
        errors = _errors(batch)
        frames: list[np.ndarray | None] = [None] * n
        seconds = np.zeros(n)
        keys = (np.asarray(x).shape for x in batch["latents"])
        for _, idx in _groups(keys, errors == "").items():
            for chunk in _chunks(idx, self.max_batch_size):
                start = time.perf_counter()
                telemetry.set_gauge("kinoray_in_flight", len(chunk), stage="decode")
                try:
                    out = self.adapter.decode(np.stack([batch["latents"][i] for i in chunk]))
                except Exception as exc:
                    log.exception("decoder failed")
                    for i in chunk:
                        errors[i] = f"decode failed: {type(exc).__name__}: {exc}"
                    telemetry.record_stage(
                        "decode", time.perf_counter() - start, len(chunk), [errors[i] for i in chunk]
                    )
                    continue
                finally:
                    telemetry.set_gauge("kinoray_in_flight", 0, stage="decode")
                elapsed = time.perf_counter() - start
                telemetry.record_stage("decode", elapsed, len(chunk), [])
                share = elapsed / len(chunk)
                for k, i in enumerate(chunk):
                    frames[i] = out[k]
                    seconds[i] = share
        empty = np.zeros((0, 0, 0, 3), np.uint8)
        out_batch = {k: v for k, v in batch.items() if k != "latents"}
        out_batch["frames"] = object_column([empty if f is None else f for f in frames])
        out_batch["error"] = errors
        out_batch["decode_s"] = seconds
        return out_batch

"""A bulk job's state: what it has decided about each row, and the manifest rows it has written.

One `JobState` runs per job as a Ray actor (`ray.remote(JobState)`), so the driver never holds
the table. It

- knows what earlier runs finished: the manifest's `ok` rows whose video still exists, and
  videos an interrupted run wrote before recording them (their metadata tag holds the request
  digest);
- decides each validated row, in input order (`claim`): generate it, skip it as done, treat it
  as the same request as an earlier row (identical content, one output), or fail it because an
  earlier row has the same explicit id and other content;
- writes every manifest row: rows it decides not to generate, at once; generated rows when the
  writer reports them (`record`). Rows are buffered for at most `FLUSH_S` seconds, then written
  as one Parquet part;
- counts rows by outcome, failures by reason and the shapes to generate, for progress, the
  summary and `--dry-run`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from kinoray.models.request import parse_loras
from kinoray.models.video import video_tag
from kinoray.pipelines import manifest

FLUSH_S = 1.0
FLUSH_ROWS = 20_000
STAGES = ("encode", "denoise", "decode", "write")
SHAPE_COLUMNS = ("width", "height", "num_frames", "num_inference_steps", "lora")
DECISION_COLUMNS = ("id", "request_digest", "status", "error_reason", "_file", "row", *SHAPE_COLUMNS)


def video_name(row_id: str, num_frames: int) -> str:
    return f"{row_id}{'.png' if num_frames == 1 else '.mp4'}"


class JobState:
    """The decisions and records of one run of a bulk job (see the module docstring)."""

    def __init__(
        self,
        output: str,
        run: str,
        files: Sequence[str],
        passthrough: Sequence[str] = (),
        dry_run: bool = False,
    ):
        """`files` are the input tables' URLs, by file index; a `dry_run` state writes nothing."""
        self.output, self.run, self.files, self.dry_run = output, run, list(files), dry_run
        self.schema = manifest.schema(passthrough)
        self.claims: dict[str, tuple[str, int, int]] = {}  # id -> (digest, file index, row)
        self.duplicates: list[dict[str, Any]] = []  # rows that share another row's output
        self.failed_ids: dict[str, str] = {}  # generated ids that failed -> error
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.busy = dict.fromkeys(STAGES, 0.0)
        self.file_rows: dict[int, int] = {}
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._seq = 0
        self._load_done()

    # -- what earlier runs finished ---------------------------------------------------------------

    def _load_done(self) -> None:
        fs, root = fsspec.core.url_to_fs(manifest.join(self.output, manifest.VIDEOS_DIR))
        self.videos_fs, self.videos_root = fs, root
        names = fs.ls(root, detail=False) if fs.exists(root) else []
        for path in names:  # half-written files of a run that was killed (one job per output)
            if path.rsplit("/", 1)[-1].startswith(".tmp-") and not self.dry_run:
                fs.rm(path)
        self.present = {p.rsplit("/", 1)[-1] for p in names if not p.rsplit("/", 1)[-1].startswith(".")}
        previous = manifest.read(self.output)
        ok = previous.filter(pc.equal(previous["status"], "ok")) if previous.num_rows else previous
        # An id done with two different requests (two runs, two contents) is not trusted as done.
        self.done: dict[str, int] = {}
        conflicted: set[str] = set()
        digests: dict[str, str] = {}
        for i, (rid, digest, output) in enumerate(
            zip(ok["id"].to_pylist(), ok["request_digest"].to_pylist(), ok["output"].to_pylist())
        ):
            if rid is None or output is None or output.rsplit("/", 1)[-1] not in self.present:
                continue
            if digests.setdefault(rid, digest) != digest:
                conflicted.add(rid)
            self.done[rid] = i
        for rid in conflicted:
            self.done.pop(rid, None)
        self.done_rows = ok.select([n for n in self.schema.names if n in ok.column_names])
        # Rows denoised by an earlier run whose decode failed: their latents, still there.
        lfs, lroot = fsspec.core.url_to_fs(manifest.join(self.output, manifest.LATENTS_DIR))
        saved = {p.rsplit("/", 1)[-1] for p in lfs.ls(lroot, detail=False)} if lfs.exists(lroot) else set()
        denoised = (
            previous.filter(pc.equal(previous["status"], "denoised")) if previous.num_rows else previous
        )
        self.saved_latents: dict[str, tuple[str, str]] = {
            rid: (digest, output)
            for rid, digest, output in zip(
                denoised["id"].to_pylist(),
                denoised["request_digest"].to_pylist(),
                denoised["output"].to_pylist(),
            )
            if output and output.rsplit("/", 1)[-1] in saved
        }

    def has_saved_latents(self) -> bool:
        """Whether some rows can be decoded from latents an earlier run saved."""
        return bool(self.saved_latents)

    def _done_record(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest row an earlier run wrote for this request, if its video is still there."""
        rid, digest = row["id"], row["request_digest"]
        index = self.done.get(rid)
        if index is not None:
            old = self.done_rows.slice(index, 1).to_pylist()[0]
            return old if old["request_digest"] == digest else None
        name = video_name(rid, row["num_frames"])
        if name in self.present:  # written by a run that was stopped before recording it
            with self.videos_fs.open(f"{self.videos_root}/{name}", "rb") as f:
                if video_tag(f.read()) == digest:
                    return {"output": manifest.join(self.output, manifest.VIDEOS_DIR, name), "run": None}
        return None

    # -- deciding rows ----------------------------------------------------------------------------

    def claim(self, table: pa.Table) -> tuple[pa.Array, dict[int, dict[str, Any]], dict[int, str]]:
        """Decide each row of a validated block (rows in input order, `DECISION_COLUMNS` at
        least): (mask of rows to generate, {row index: changes that make the manifest row of
        a row not generated}, {row index: saved latents to decode instead of denoising}). The
        caller builds the rows not generated and hands them to `add`."""
        cols = {c: table[c].to_pylist() for c in DECISION_COLUMNS}
        keep = []
        changes: dict[int, dict[str, Any]] = {}
        resume: dict[int, str] = {}
        for i in range(table.num_rows):
            change = self._decide({c: v[i] for c, v in cols.items()})
            if isinstance(change, str):
                resume[i] = change
                change = None
            keep.append(change is None)
            if change is not None:
                changes[i] = change
        mask = pa.array(keep, pa.bool_())
        if any(keep):
            shapes = (
                table.filter(mask)
                .group_by(list(SHAPE_COLUMNS), use_threads=False)
                .aggregate([("id", "count")])
            )
            for shape in shapes.to_pylist():
                self.shapes[_shape(shape)] += shape["id_count"]
        return mask, changes, resume

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Manifest rows of rows that `claim` decided not to generate."""
        self.duplicates.extend(r for r in rows if r["status"] == "duplicate")
        self._add(rows)

    def _decide(self, row: dict[str, Any]) -> dict[str, Any] | str | None:
        """None to generate the row; the URL of its saved latents to decode them; otherwise the
        changes that make its manifest row."""
        if row["status"] == "failed":
            self.counts["failed"] += 1
            self.reasons[row["error_reason"]] += 1
            return {"run": self.run}
        rid, digest, position = row["id"], row["request_digest"], (row["_file"], row["row"])
        claimed = self.claims.get(rid)
        if claimed is not None:
            first = f"row {claimed[2]} of {self.files[claimed[1]]}"
            if claimed[0] != digest:
                self.counts["failed"] += 1
                self.reasons["duplicate_id"] += 1
                return {
                    "run": self.run,
                    "status": "failed",
                    "error": f"duplicate id {rid!r}: {first} has this id and other content",
                    "error_stage": "validate",
                    "error_reason": "duplicate_id",
                }
            self.counts["duplicate"] += 1
            return {
                "run": self.run,
                "status": "duplicate",
                "output": self._output(row),
                "error": f"same request as {first}",
            }
        self.claims[rid] = (digest, *position)
        old = self._done_record(row)
        if old is not None:
            self.counts["skipped"] += 1
            return {**{k: v for k, v in old.items() if k in manifest.OUTCOME_COLUMNS}, "status": "ok"}
        self.counts["generate"] += 1
        saved = self.saved_latents.get(rid)
        if saved is not None and saved[0] == digest:
            self.counts["resumed"] += 1
            return saved[1]
        if saved is not None and not self.dry_run:
            # The row changed since its latents were saved: they can never be used.
            fs, path = fsspec.core.url_to_fs(saved[1])
            fs.rm(path)
            del self.saved_latents[rid]
        return None

    def _output(self, row: dict[str, Any]) -> str:
        return manifest.join(self.output, manifest.VIDEOS_DIR, video_name(row["id"], row["num_frames"]))

    # -- recording rows ---------------------------------------------------------------------------

    def record(self, table: pa.Table) -> None:
        """Manifest rows of generated rows, as the writer finished them."""
        rows = table.to_pylist()
        for row in rows:
            # A denoised row is not lost: its latents are saved for the next run to decode.
            status = row["status"] if row["status"] in ("ok", "denoised") else "generate_failed"
            self.counts[status] += 1
            if status == "generate_failed":
                self.reasons[row["error_reason"] or "unknown"] += 1
            if status != "ok":
                self.failed_ids[row["id"]] = row["error"] or ""
            for stage in STAGES:
                self.busy[stage] += row.get(f"{stage}_s") or 0.0
        self._add(rows)

    def file_read(self, index: int, rows: int) -> None:
        """File `index` has been read to its end: it holds `rows` rows."""
        self.file_rows[index] = rows

    def _add(self, rows: list[dict[str, Any]]) -> None:
        if self.dry_run:
            return
        rows = [{**r, "image": manifest.image_label(r.get("image"))} for r in rows]
        self._buffer.append(pa.Table.from_pylist(rows, schema=self.schema))
        self._buffered += len(rows)
        if self._buffered >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one manifest part."""
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        manifest.write_part(self.output, table, self.run, self._seq)
        self._seq += 1
        self._buffer, self._buffered = [], 0

    # -- reporting --------------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """Counts so far; `total` is known once every file has been read. Flushes when due."""
        if time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()
        c = self.counts
        finished = (
            c["ok"] + c["denoised"] + c["generate_failed"] + c["failed"] + c["skipped"] + c["duplicate"]
        )
        return {
            "total": sum(self.file_rows.values()) if len(self.file_rows) == len(self.files) else None,
            "finished": finished,
            "generated": c["ok"],
            "failed": c["failed"] + c["generate_failed"],
            "skipped": c["skipped"],
            "duplicate": c["duplicate"],
            "to_generate": c["generate"],
            "resumed": c["resumed"],
            "denoised": c["denoised"],
            "reasons": dict(self.reasons),
            "shapes": dict(self.shapes),
            "busy_s": dict(self.busy),
        }

    def finish(self) -> dict[str, Any]:
        """Give rows that share another row's output that row's outcome; flush; final counts."""
        if self.duplicates:
            fixed = []
            for dup in self.duplicates:
                error = self.failed_ids.get(dup["id"])
                if error is None:
                    fixed.append({**dup, "status": "ok", "error": None})
                else:
                    fixed.append(
                        {**dup, "status": "failed", "output": None, "error": f"{dup['error']}: {error}"}
                    )
                    self.counts["failed"] += 1
                    self.counts["duplicate"] -= 1
            self.duplicates = []
            self._add(fixed)
        self.flush()
        return self.progress()


def _shape(row: dict[str, Any]) -> str:
    shape = f"{row['width']}x{row['height']}, {row['num_frames']} frames, {row['num_inference_steps']} steps"
    adapters = parse_loras(row.get("lora"))
    return shape + (", lora " + " + ".join(f"{r.name}:{r.scale:g}" for r in adapters) if adapters else "")

"""A bulk job: prompt tables -> validate -> claim -> encode pool -> denoise pool -> decode pool ->
videos + manifest, streamed by Ray Data so that the driver never holds the table.

1. resolve the prompt source into files, each checked by its header (a bad file fails here);
2. read the files with Ray Data (`PromptTables`), spread over the cluster;
3. validate each row in the pipeline (`validate_rows`): a bad row becomes a failed manifest row;
4. claim each row in input order (`JobState`): generate it, skip it as done, share another row's
   output, or fail it as a colliding id; rows to generate are bucketed by sampling parameters;
5. the three stage pools, each `map_batches` with its own `ActorPoolStrategy`;
6. write each video and report its manifest row to the job's state, which writes the parts.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa

from kinoray.models.config import KinorayConfig, StageConfig
from kinoray.models.request import RequestBuilder
from kinoray.models.stages import RESUME_COLUMN, Decoder, Denoiser, TextEncoder
from kinoray.pipelines import manifest
from kinoray.pipelines.progress import JobMetrics
from kinoray.pipelines.sources import InputError, PromptFile, PromptTables, resolve
from kinoray.pipelines.state import DECISION_COLUMNS, JobState
from kinoray.pipelines.validate import sampling_order, validate_rows
from kinoray.pipelines.writer import LATENTS_PATH, load_saved_latents, write_videos

log = logging.getLogger(__name__)
PROGRESS_POLL_S = 0.5
READ_CPUS = 0.25
VALIDATE_CPUS = 0.5
BLOCK_BYTES = 1 << 20


class JobInterrupted(BaseException):
    """The job was stopped by a signal; `code` is the exit code (130 SIGINT, 143 SIGTERM) and
    `summary` what was finished and recorded before it stopped. A BaseException, like
    KeyboardInterrupt: a request to stop, not an error for code in between (Ray Data's) to log."""

    def __init__(self, signal_name: str, code: int):
        super().__init__(signal_name)
        self.signal_name, self.code = signal_name, code
        self.summary: JobSummary | None = None


@dataclass
class JobSummary:
    """What a run did; `render()` is what `kinoray batch` prints."""

    output: str
    run: str
    dry_run: bool = False
    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    duplicate: int = 0
    to_generate: int = 0
    resumed: int = 0
    denoised: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=dict)
    interrupted: str | None = None
    # Whether the run started the local Ray cluster it ran on (and so may end it).
    started_cluster: bool = False

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def render(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        why = f" ({reasons})" if reasons else ""
        if self.dry_run:
            width = max([40, *(len(shape) + 2 for shape in self.shapes)])
            lines = [
                f"dry run: {self.total} rows",
                f"  to generate: {self.to_generate}"
                + (f" ({self.resumed} decoded from saved latents)" if self.resumed else ""),
                f"  to skip (done): {self.skipped}",
                f"  same request as another row: {self.duplicate}",
                f"  to fail: {self.failed}{why}",
                "shapes to generate:",
                *(
                    f"  {shape:<{width}}{n:>10}"
                    for shape, n in sorted(self.shapes.items(), key=lambda kv: -kv[1])
                ),
            ]
            return "\n".join(lines)
        busy = ", ".join(f"{k} {v:.1f}s" for k, v in self.busy_s.items())
        latents = ""
        if self.resumed:
            latents += f"decoded from saved latents: {self.resumed}\n"
        if self.denoised:
            latents += (
                f"latents saved (decode out of memory; the same command decodes them): {self.denoised}\n"
            )
        return (
            f"rows: {self.ok} ok, {self.failed} failed{why}, {self.skipped} skipped as done, "
            f"{self.duplicate} same as another row (of {self.total})\n"
            f"{latents}"
            f"wall time: {self.wall_s:.1f}s, {self.videos_per_minute:.1f} videos/min\n"
            f"stage busy time: {busy}\n"
            f"manifest: {manifest.join(self.output, manifest.MANIFEST_DIR)}"
        )


def _check_output(output: str, dry_run: bool) -> None:
    """Refuse an output that cannot be a folder, before Ray starts (a dry run creates nothing)."""
    fs, root = fsspec.core.url_to_fs(output)
    if fs.exists(root) and not fs.isdir(root):
        raise InputError(f"--output {output}: is a file, not a folder")
    if not dry_run and "file" in fs.protocol:  # object stores have no folders to create
        try:
            fs.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--output {output}: cannot create the folder: {exc}") from None


def state_name(run: str) -> str:
    """The name of run `run`'s JobState actor."""
    return f"kinoray-job-{run}"


def _run_id() -> str:
    # Sorts by start time: manifest parts of later runs win.
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def claim_rows(block: pa.Table, state_name: str, dry_run: bool) -> pa.Table:
    """The claim step: asks the job's state to decide each row of `block` and returns the rows
    to generate, bucketed by sampling parameters. It runs one block at a time, in input order.
    The state is found by name rather than passed as a handle: a handle among a step's
    arguments puts them in the object store."""
    import ray

    state = ray.get_actor(state_name)
    keep, changes, resume = ray.get(state.claim.remote(block.select(list(DECISION_COLUMNS))))
    if changes:
        decided = block.take(pa.array(list(changes), pa.int64())).to_pylist()
        ray.get(state.add.remote([{**row, **c} for row, c in zip(decided, changes.values())]))
    if dry_run:
        return block.slice(0, 0)
    # Rows whose latents an earlier run saved start at the decode stage, from that file.
    paths = [resume.get(i) for i in range(block.num_rows)]
    block = block.append_column(
        RESUME_COLUMN, pa.array(["decode" if p else None for p in paths], pa.string())
    )
    block = block.append_column(LATENTS_PATH, pa.array(paths, pa.string()))
    return sampling_order(block.filter(keep))


def _pool(stage: StageConfig) -> dict[str, Any]:
    import ray.data

    # Ray Data restarts a dead pool actor and retries its batches by default (max_restarts=-1).
    return {
        "compute": ray.data.ActorPoolStrategy(
            min_size=max(1, stage.min_replicas), max_size=stage.max_replicas
        ),
        "batch_size": stage.batch_size,
        "batch_format": "numpy",
        **stage.ray_resources(),
    }


def build_dataset(
    files: Sequence[PromptFile],
    builder: RequestBuilder,
    config: KinorayConfig,
    output: str,
    run: str,
    state: Any,
    dry_run: bool = False,
    resume_latents: bool = False,
) -> Any:
    """The job's Ray Data pipeline (lazy); its output is each finished row's status.

    With `resume_latents`, a step before the decoder loads the latents that rows marked by the
    claim step resume from."""
    import ray.data

    passthrough = list(config.batch.passthrough_columns)
    # A FileBasedDatasource of kinoray's own rather than read_json/read_csv/read_parquet: those
    # infer one schema per block (a row of another type fails the whole read) and do not give a
    # row's position in its file, which the manifest records and errors cite.
    # Reading and validating take a small CPU share each, so that they are scheduled even where
    # the stage actors hold every CPU of a node. Their shares differ on purpose: Ray Data fuses
    # operators of equal resources into one task, and validation must run in tasks of its own
    # to spread one large file's rows over every core while the file is still being read.
    ds = ray.data.read_datasource(
        PromptTables(files, state.file_read), override_num_blocks=len(files), num_cpus=READ_CPUS
    )
    ds = ds.map_batches(
        validate_rows,
        fn_kwargs={"builder": builder, "files": [f.url for f in files], "passthrough": passthrough},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=VALIDATE_CPUS,
    )
    # One claim at a time, in input order: "the first row with an id" is first by file and row.
    # Tasks rather than an actor: they run in the workers already started for reading.
    ds = ds.map_batches(
        claim_rows,
        fn_kwargs={"state_name": state_name(run), "dry_run": dry_run},
        compute=ray.data.TaskPoolStrategy(size=1),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
    )
    if dry_run:
        return ds
    spec = config.model.model_dump()
    ds = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs={"model": spec, **config.encode_options()},
        **_pool(config.encoder),
    )
    ds = ds.map_batches(
        Denoiser,
        fn_constructor_kwargs={"model": spec, **config.denoise_options()},
        **_pool(config.denoiser),
    )
    if resume_latents:
        ds = ds.map_batches(load_saved_latents, batch_format="numpy", batch_size=None, num_cpus=READ_CPUS)
    ds = ds.map_batches(
        Decoder,
        fn_constructor_kwargs={"model": spec, **config.decoder.decode_options()},
        **_pool(config.decoder),
    )
    return ds.map_batches(
        write_videos,
        fn_kwargs={"output": output, "run": run, "state": state, "passthrough": passthrough},
        batch_size=config.decoder.batch_size,
        batch_format="numpy",
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=config.batch.write_concurrency),
    )


def _init_ray(
    config: KinorayConfig,
    address: str | None,
    num_cpus: int | None,
    dry_run: bool = False,
    verbose: bool = False,
) -> bool:
    """Connect to Ray; returns whether this call started a local cluster."""
    from kinoray.models.cluster import check_placeable, connect, local_cpus

    # A dry run starts no stage: its validation tasks get the cores.
    cpus = num_cpus or local_cpus(config, extra=1, stages=not dry_run)
    started = connect(config, address, cpus, verbose)
    if not dry_run:
        check_placeable(config, 1, started)
    return started


def run_job(
    prompts: str | Sequence[str],
    output: str,
    config: KinorayConfig | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    on_rows: Callable[[int], None] | None = None,
    dry_run: bool = False,
    verbose: bool = False,
) -> JobSummary:
    """Generate every row of `prompts` (a file, a folder of parts, a glob or a list of these)
    not already done in `output`; `on_rows(n)` hears of each batch of `n` finished videos.

    With `dry_run`, rows are read, validated and planned without loading any model.
    Raises `InputError` for a source that cannot be used (before anything starts),
    `ConfigError` when the stage pools cannot be placed on the local cluster this call started
    (see `cluster.unplaceable`), and `JobInterrupted` after SIGINT/SIGTERM, once what finished is
    recorded.
    """
    import ray
    import ray.data

    config = config or KinorayConfig()
    start = time.perf_counter()
    passthrough = list(config.batch.passthrough_columns)
    files = resolve(prompts, passthrough)
    _check_output(output, dry_run)
    builder = config.request_builder()  # the checkpoint's configs only; no weights
    run = _run_id()
    started = _init_ray(config, ray_address, num_cpus, dry_run, verbose)
    context = ray.data.DataContext.get_current()
    saved = (
        context.enable_progress_bars,
        context.execution_options.preserve_order,
        context.target_max_block_size,
    )
    # Rows are claimed in input order, so "the first row with an id" means first by file and row.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the job draws its own
    # A stage task emits a block each time its output reaches this size, so small blocks stream
    # through the pools batch by batch instead of an input block at a time (Ray Data's default,
    # 128 MiB, would hold thousands of rows of a small model's embeddings in one block).
    context.target_max_block_size = BLOCK_BYTES
    state = (
        ray.remote(num_cpus=0)(JobState)
        .options(name=state_name(run))
        .remote(output, run, [f.url for f in files], passthrough, dry_run)
    )
    metrics = JobMetrics(run, config.batch.metrics_port, config.batch.pushgateway)
    bar = _ProgressBar(progress and not dry_run)
    interrupted: JobInterrupted | None = None
    # Progress comes from the job's state while rows finish, not when results reach this loop
    # (they arrive in input order, so one slow early row would hold the bar back).
    stop_polling = threading.Event()

    def poll() -> None:
        while not stop_polling.wait(PROGRESS_POLL_S):
            counts = ray.get(state.progress.remote())
            bar.update(counts, time.perf_counter() - start)
            metrics.update(counts)

    poller = threading.Thread(target=poll, daemon=True)
    batches = None
    try:
        resume_latents = ray.get(state.has_saved_latents.remote())
        dataset = build_dataset(files, builder, config, output, run, state, dry_run, resume_latents)
        poller.start()
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        for batch in batches:
            if on_rows is not None and batch.num_rows:
                on_rows(batch.num_rows)
        stop_polling.set()
        poller.join()
        bar.update(ray.get(state.progress.remote()), time.perf_counter() - start)
    except KeyboardInterrupt:
        interrupted = JobInterrupted("SIGINT", 130)
    except JobInterrupted as exc:
        interrupted = exc
    finally:
        if interrupted is not None and batches is not None:
            # Closing the iterator shuts Ray Data's executor down now: a stopped job writes no
            # more videos while what it finished is recorded.
            batches.close()
        stop_polling.set()
        if poller.is_alive():
            poller.join()
        (
            context.enable_progress_bars,
            context.execution_options.preserve_order,
            context.target_max_block_size,
        ) = saved
        bar.close()
    counts = ray.get(state.finish.remote(), timeout=60)
    metrics.update(counts)
    metrics.finish()
    if interrupted is None and not dry_run:
        ray.get(ray.remote(num_cpus=0)(manifest.compact).remote(output, run))
    ray.kill(state)
    summary = JobSummary(
        output=output,
        run=run,
        dry_run=dry_run,
        total=counts["total"] or counts["finished"],
        ok=counts["generated"],
        failed=counts["failed"],
        skipped=counts["skipped"],
        duplicate=counts["duplicate"],
        to_generate=counts["to_generate"],
        resumed=counts["resumed"],
        denoised=counts["denoised"],
        reasons=counts["reasons"],
        shapes=counts["shapes"],
        wall_s=time.perf_counter() - start,
        busy_s=counts["busy_s"],
        interrupted=interrupted.signal_name if interrupted else None,
        started_cluster=started,
    )
    if started and interrupted is not None:
        ray.shutdown()
    if interrupted is not None:
        interrupted.summary = summary
        raise interrupted
    return summary


class _ProgressBar:
    """Rows finished against the total once it is known, and videos per minute."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="row", desc="kinoray", file=sys.stderr, mininterval=1.0)

    def update(self, counts: dict[str, Any], elapsed: float) -> None:
        if self.bar is None:
            return
        if counts["total"] is not None and self.bar.total != counts["total"]:
            self.bar.total = counts["total"]
        self.bar.update(counts["finished"] - self.bar.n)
        self.bar.set_postfix(
            videos_per_min=f"{60.0 * counts['generated'] / max(elapsed, 1e-9):.1f}", refresh=False
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

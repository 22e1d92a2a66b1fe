"""`kinoray`: generate one video, run a bulk job, serve the API, or benchmark."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, NoReturn

from kinoray.models.request import field_type, is_scalar, request_fields

# Request fields the generate command takes as flags (the prompt is positional, the id derived).
REQUEST_FLAGS = [f for f in request_fields() if f not in ("id", "prompt")]


class UserError(Exception):
    """A mistake the user can fix: printed as one `error:` line, exit code 2."""


def _load_config(args: argparse.Namespace) -> Any:
    from kinoray.models.config import ConfigError, KinorayConfig

    updates = {k: getattr(args, k) for k in ("weights", "device", "dtype") if getattr(args, k, None)}
    try:
        # The flags replace the file's and $KINORAY_MODEL's values before either is checked.
        return KinorayConfig.load(args.config, model=updates)
    except ConfigError as exc:
        flags = {"weights": "--model", "device": "--device", "dtype": "--dtype"}
        for key in updates:
            problem = str(exc).partition(f"model.{key}: ")[2]
            if problem:
                raise UserError(f"{flags[key]}: {problem.split('; ')[0]}") from None
        raise


def cmd_generate(args: argparse.Namespace) -> int:
    import fsspec

    from kinoray.models.local import LocalPipeline
    from kinoray.models.request import RequestError
    from kinoray.models.video import encode_video, video_suffix

    config = _load_config(args)
    builder = config.request_builder()  # the checkpoint's configs only: no weights yet
    fields = {k: getattr(args, k) for k in REQUEST_FLAGS if getattr(args, k) is not None}
    try:
        request = builder.build({"prompt": args.prompt, **fields})
    except RequestError as exc:
        raise UserError(str(exc)) from None
    suffix = video_suffix(request.sampling.num_frames)
    if args.output and os.path.splitext(args.output)[1].lower() not in (suffix, ""):
        # One frame is written as a PNG image, more as an MP4 video: the name says which.
        raise UserError(
            f"--output: {request.sampling.num_frames} frame(s) are written as {suffix}, "
            f"so name it {os.path.splitext(args.output)[0]}{suffix}"
        )
    output = args.output or f"{request.id}{suffix}"
    _check_output(output)
    _check_device(config)
    if request.image is not None:  # read before any model loads: a wrong path fails at once
        from kinoray.models.images import ImageError, load_image

        try:
            load_image(request.image, config.images)
        except ImageError as exc:
            raise UserError(f"image: {exc}") from None
    # Ctrl-C is noted and acted on once the running torch call returns: a KeyboardInterrupt
    # raised inside torch or a finalizer can be swallowed, and the video written anyway.
    stop = _NoteSigint()
    with stop:
        pipeline = LocalPipeline(config, builder)
        start = time.perf_counter()
        out = pipeline.run([request])
    if stop.seen:
        raise KeyboardInterrupt
    if out["error"][0]:
        print(f"error: {out['error'][0]}", file=sys.stderr)
        return 1
    try:
        with fsspec.open(output, "wb") as f:
            f.write(encode_video(out["frames"][0], request.sampling.fps))
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"--output {output}: {type(exc).__name__}: {exc}") from None
    s = request.sampling
    print(
        json.dumps(
            {
                "output": output,
                "id": request.id,
                "seed": request.seed,
                "size": f"{s.width}x{s.height}",
                "frames": s.num_frames,
                "fps": s.fps,
                "wall_s": round(time.perf_counter() - start, 3),
            }
        )
    )
    return 0


def _check_output(output: str, flag: str = "--output") -> None:
    """Refuse a local output path that cannot be written, before any model loads."""
    if "://" in output:
        return
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UserError(f"{flag} {output}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {output}: no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {output}: cannot write to {folder}")


class _NoteSigint:
    """While active, SIGINT sets `seen` and interrupts at the next Python step. An interrupt
    that lands in a finalizer (where Python can only print and drop it) is dropped quietly:
    `seen` still stops the command."""

    def __init__(self) -> None:
        self.seen = False

    def __enter__(self) -> _NoteSigint:
        import signal

        def on_sigint(signum: int, frame: Any) -> None:
            self.seen = True
            raise KeyboardInterrupt

        def unraisable(info: Any) -> None:
            if not isinstance(info.exc_value, KeyboardInterrupt):
                self._hook(info)

        self._previous = signal.signal(signal.SIGINT, on_sigint)
        self._hook, sys.unraisablehook = sys.unraisablehook, unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)
        sys.unraisablehook = self._hook


def cmd_batch(args: argparse.Namespace) -> int:
    import signal

    from kinoray.models.cluster import StderrFilter, check_reachable, needed_cpus, unplaceable
    from kinoray.pipelines.job import JobInterrupted, run_job
    from kinoray.pipelines.sources import InputError

    def on_sigterm(signum: int, frame: Any) -> None:
        raise JobInterrupted("SIGTERM", 143)

    signal.signal(signal.SIGTERM, on_sigterm)
    config = _load_config(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.num_cpus is not None and address:
        raise UserError(
            "--num-cpus: sizes a local cluster; a cluster given with --address or RAY_ADDRESS has its own"
        )
    if address:
        check_reachable(address)  # before the job's imports: Ray would retry for a long while
    if args.num_cpus is not None and not args.dry_run:
        # Before Ray starts: on too few CPUs the stage pools would wait forever.
        problem = unplaceable(config, [{"CPU": args.num_cpus}], 1, resources=("CPU",))
        if problem:
            raise UserError(
                f"--num-cpus {args.num_cpus}: {problem}; give at least {needed_cpus(config, 1)}, "
                "or lower the stage settings named"
            )
    try:
        with contextlib.nullcontext() if args.verbose else StderrFilter():
            summary = run_job(
                args.prompts,
                args.output,
                config,
                ray_address=args.address,
                num_cpus=args.num_cpus,
                dry_run=args.dry_run,
                verbose=args.verbose,
            )
    except InputError as exc:
        raise UserError(str(exc)) from None
    except JobInterrupted as exc:
        done = exc.summary
        kept = (
            f"{done.ok} videos written and recorded this run, {done.skipped} already done"
            if done
            else "nothing"
        )
        print(
            f"kinoray: stopped by {exc.signal_name}: {kept}; run the same command to finish the rest",
            file=sys.stderr,
        )
        return exc.code
    print(summary.render())
    # 3: not every row has its video (failed rows, or rows whose latents wait for a rerun).
    # The local cluster this command started has nothing left to do (see `main`).
    args.cluster_done = summary.started_cluster
    return 0 if summary.failed == 0 and summary.denoised == 0 else 3


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kinoray.deployments.run import serve_forever
    from kinoray.models.config import ServeConfig, explain

    config = _load_config(args)
    changes = {
        k: getattr(args, k) for k in ("host", "port", "storage", "api_keys") if getattr(args, k) is not None
    }
    if changes:
        try:
            serve_config = ServeConfig.model_validate({**config.serve.model_dump(), **changes})
        except ValidationError as exc:
            message = explain(exc, ServeConfig)
            for key in changes:
                flag = f"--{key.replace('_', '-').removesuffix('s')}"
                message = re.sub(rf"\b{key}(\.\d+)?: ", f"{flag}: ", message)
            raise UserError(message) from None
        config = config.model_copy(update={"serve": serve_config})
    _check_listen(config.serve.host, config.serve.port)
    return serve_forever(config, address=args.address, verbose=args.verbose)


def _check_listen(host: str, port: int) -> None:
    """Refuse, before Ray starts, an address this machine cannot listen on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        reason = "in use" if getattr(exc, "errno", None) == 98 else (exc.strerror or str(exc))
        raise UserError(
            f"cannot listen on {host}:{port} ({reason}); set --host/--port or serve.host/serve.port"
        ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from kinoray.bench import main as bench_main

    return bench_main(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from kinoray.evaluate import VARIANTS, PromptTableError, builtin_sets, table_set
    from kinoray.evaluate import main as eval_main

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)}, all)")
    config = _load_config(args)
    _check_device(config)
    for flag, path in (("--out", args.out), ("--strip", args.strip)):
        if path:
            _check_output(path, flag)
    if args.strip:
        from PIL import Image

        suffix = os.path.splitext(args.strip)[1].lower()
        if suffix not in Image.registered_extensions():
            raise UserError(f"--strip {args.strip}: not an image file name (e.g. strip.png)")
    try:
        sets = (
            {p: table_set(p) for p in args.prompts}
            if args.prompts
            else builtin_sets(*[args.seeds] if args.seeds else [])
        )
    except PromptTableError as exc:
        raise UserError(str(exc)) from None
    return eval_main(args, config, sets, variants)


def _finite_float(text: str) -> float:
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _check_device(config: Any) -> None:
    """Refuse a CUDA device that this torch build cannot see, before any model loads."""
    if config.model.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {config.model.device}: this torch build sees no CUDA device")


def cmd_train_shapes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kinoray.models.shapes_train import TrainSettings, train

    names = TrainSettings.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    bad = next((k for k, v in values.items() if k != "seed" and v <= 0), None)
    if bad:
        raise UserError(f"--{bad.replace('_', '-')}: must be positive (got {values[bad]})")
    dest = Path(args.output)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"--output {dest}: already exists; give a new folder (nothing is overwritten)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {dest}: cannot create it ({exc.strerror})") from None
    record = train(dest, TrainSettings(**values), log=lambda line: print(line, flush=True))
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=2))
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from kinoray.models import tiny

    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )
    p.add_argument("--verbose", action="store_true", help="show Ray's and Ray Serve's INFO logs")
    p.add_argument(
        "--config", metavar="YAML", help="config file: model, stages, defaults, limits (default: none)"
    )
    p.add_argument(
        "--model",
        dest="weights",
        metavar="WEIGHTS",
        help=f"a preset ({', '.join(tiny.preset_names())}), a local diffusers folder or a hub id "
        f"(default: the config's, else {tiny.DEFAULT_MODEL})",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and compute dtype (default: auto, bfloat16 on CUDA and float32 on CPU)",
    )


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    """One flag per request field, named after it (`--num-frames`), typed and described by it."""
    from kinoray.models import tiny

    fields = request_fields()
    shown = tiny.preset_defaults(tiny.DEFAULT_MODEL)
    for name in REQUEST_FLAGS:
        info = fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags = [f"--{name.replace('_', '-')}", *([str(extra["cli"])] if "cli" in extra else [])]
        default = "derived from the id" if name == "seed" else "the model's"
        if name in shown:
            default += f"; {shown[name]} for {tiny.DEFAULT_MODEL}"
        if not is_scalar(info):  # a list (`lora`): the flag is repeated, one NAME[:SCALE] each
            p.add_argument(
                *flags,
                dest=name,
                action="append",
                metavar="NAME[:SCALE]",
                help=f"{info.description}; repeatable",
            )
            continue
        p.add_argument(
            *flags,
            dest=name,
            # NaN means "not given" in a table; typed as a flag it is a mistake.
            type=_finite_float if field_type(info) is float else field_type(info),
            # A description may name its own default (guidance_scale_2: guidance_scale's value).
            help=info.description
            if "(default:" in str(info.description)
            else f"{info.description} (default: {default})",
        )


class _Parser(argparse.ArgumentParser):
    """argparse with a mistake in the flags reported as one `error:` line and exit 2, like every
    other mistake (argparse's own prints the usage block first); `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kinoray", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs (or set KINORAY_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one video, in this process")
    g.add_argument("prompt", help="what to generate")
    g.add_argument("-o", "--output", help="file or fsspec URL (default: <id>.mp4, or <id>.png for one frame)")
    _add_model_flags(g)
    _add_request_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("batch", help="a bulk job: prompt table in, videos + manifest out")
    b.add_argument(
        "prompts",
        nargs="+",
        help="prompt tables: files, folders of parts or globs (JSONL, CSV, TSV, JSON, Parquet; any fsspec URL)",
    )
    b.add_argument("-o", "--output", required=True, help="output folder (fsspec URL)")
    _add_model_flags(b)
    b.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    b.add_argument(
        "--num-cpus",
        type=_positive_int,
        help="logical CPUs of a local Ray cluster (default: enough for the stages)",
    )
    b.add_argument(
        "--dry-run", action="store_true", help="read and validate every row, load no model, print the plan"
    )
    b.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="the OpenAI-compatible Videos API on Ray Serve")
    _add_model_flags(s)
    s.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    s.add_argument("--host", help="address to listen on (default: the config's serve.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: the config's serve.port, 8000)")
    s.add_argument(
        "--storage",
        help="fsspec URL of job records and videos (default: the config's serve.storage, "
        "else $KINORAY_STORAGE, else ./kinoray-store)",
    )
    s.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="a bearer token clients must send; repeat for several (default: the config's "
        "serve.api_keys; none means no auth)",
    )
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("bench", help="kinoray against a diffusers loop and a one-stage Ray Data job")
    _add_model_flags(k)
    k.add_argument("--rows", type=int, default=24, help="prompts in the bulk comparison (default: 24)")
    k.add_argument(
        "--online-requests",
        type=int,
        default=16,
        help="requests per concurrency level, 0 to skip (default: 16)",
    )
    k.add_argument("--out", default="bench-results", help="results folder (default: bench-results)")
    k.add_argument(
        "--decode-memory",
        action="store_true",
        help="instead: measure each family's VAE decode memory factor on its tiny preset",
    )
    k.add_argument(
        "--scale",
        type=int,
        metavar="ROWS",
        help="instead: a table of ROWS generated rows, as JSONL and as Parquet parts: --dry-run speed, "
        "driver memory, time to the first video",
    )
    k.add_argument(
        "--startup",
        action="store_true",
        help="instead: seconds from the command to the first result of batch, serve and generate",
    )
    k.add_argument(
        "--status-reads",
        action="store_true",
        help="instead: status reads per second of `kinoray serve` with 8 and 32 pollers of a running job",
    )
    k.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="with --startup or --status-reads: also measure another kinoray checkout (first on PYTHONPATH)",
    )
    k.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        metavar="N",
        help="with --startup: runs of each command; the median is reported (default: 3)",
    )
    k.set_defaults(func=cmd_bench)

    t = sub.add_parser(
        "train-shapes",
        help="train the shapes-wan preset from scratch on rendered scenes (CPU, ~25 min on 2 cores)",
    )
    t.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    from kinoray.models.shapes_train import TrainSettings

    for name, f in TrainSettings.__dataclass_fields__.items():
        t.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(f.default),
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    t.set_defaults(func=cmd_train_shapes)

    e = sub.add_parser(
        "eval", help="prompt adherence of a shapes model: colour, motion and shape read from its frames"
    )
    _add_model_flags(e)
    e.add_argument(
        "--variants",
        default="default",
        help="comma-separated: default, first_block_cache, tiled_decode, half_steps, bfloat16; or all "
        "(default: default)",
    )
    e.add_argument(
        "--limit",
        type=_positive_int,
        help="the first N videos of each set (default: all)",
    )
    e.add_argument(
        "--seeds",
        type=_positive_int,
        help="videos per built-in prompt, each with its own seed (default: 3, so 135 seen + 45 held out)",
    )
    e.add_argument(
        "--prompts",
        nargs="+",
        metavar="JSONL",
        help="prompt tables to score instead of the built-in sets (rows whose prompt names a colour, "
        "a shape and a motion)",
    )
    e.add_argument("--out", help="also write the results as JSON here")
    e.add_argument("--strip", metavar="PNG", help="also write the first variant's videos as rows of frames")
    e.set_defaults(func=cmd_eval)
    return parser


def _user_message(exc: BaseException) -> str | None:
    """The one line to print for a mistake the user can fix; None for anything else."""
    from kinoray.models.config import ConfigError
    from kinoray.models.request import RequestError
    from kinoray.models.spec import ModelError

    if isinstance(exc, (UserError, ConfigError, ModelError, RequestError)):
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2: a mistake to fix, 130: interrupted).

    With `argv` None this process is the command (`kinoray ...`): a command that finished on a
    local Ray cluster of its own ends the process at once (`cluster.exit_now`) instead of
    returning. Called with `argv`, as a library, it always returns.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("KINORAY_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=os.environ.get("KINORAY_LOG", "DEBUG" if debug else "WARNING"))
    try:
        code = int(args.func(args))
        if argv is None and getattr(args, "cluster_done", False):
            from kinoray.models.cluster import exit_now

            exit_now(code)
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print("kinoray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_message(exc)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        if argv is None and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            from kinoray.models.cluster import exit_now

            # Found after Ray started (the cluster cannot place the stages): nothing is in flight.
            exit_now(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())

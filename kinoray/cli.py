"""`kinoray`: generate one video, run a bulk job, serve the API, or benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from kinoray.models.request import field_type, request_fields

# Request fields the generate command takes as flags (the prompt is positional, the id derived).
REQUEST_FLAGS = [f for f in request_fields() if f not in ("id", "prompt")]


def _load_config(args: argparse.Namespace) -> Any:
    from kinoray.models.config import KinorayConfig

    config = KinorayConfig.load(args.config)
    updates = {k: getattr(args, k) for k in ("weights", "device", "dtype") if getattr(args, k, None)}
    return config.with_model(**updates) if updates else config


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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = LocalPipeline(config, builder)
    start = time.perf_counter()
    out = pipeline.run([request])
    if out["error"][0]:
        print(f"error: {out['error'][0]}", file=sys.stderr)
        return 1
    output = args.output or f"{request.id}{video_suffix(request.sampling.num_frames)}"
    with fsspec.open(output, "wb") as f:
        f.write(encode_video(out["frames"][0], request.sampling.fps))
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
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import signal

    from kinoray.pipelines.job import JobInterrupted, run_job
    from kinoray.pipelines.sources import InputError

    def on_sigterm(signum: int, frame: Any) -> None:
        raise JobInterrupted("SIGTERM", 143)

    signal.signal(signal.SIGTERM, on_sigterm)
    config = _load_config(args)
    try:
        summary = run_job(
            args.prompts,
            args.output,
            config,
            ray_address=args.address,
            num_cpus=args.num_cpus,
            dry_run=args.dry_run,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    return 0 if summary.failed == 0 and summary.denoised == 0 else 3


def cmd_serve(args: argparse.Namespace) -> int:
    from kinoray.deployments.run import serve_forever

    serve_forever(_load_config(args), address=args.address)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kinoray.bench import main as bench_main

    return bench_main(args)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (model, stages, defaults, limits)")
    p.add_argument(
        "--model", dest="weights", help="preset, local diffusers folder or hub id (default: tiny-wan)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    """One flag per request field, named after it (`--num-frames`), typed and described by it."""
    fields = request_fields()
    for name in REQUEST_FLAGS:
        info = fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags = [f"--{name.replace('_', '-')}", *([str(extra["cli"])] if "cli" in extra else [])]
        p.add_argument(
            *flags, dest=name, type=field_type(info), help=f"{info.description} (default: the model's)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kinoray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one video, in this process")
    g.add_argument("prompt", help="what to generate")
    g.add_argument("-o", "--output", help="file or fsspec URL (default: <id>.mp4)")
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
    b.add_argument("--address", help="Ray cluster address (default: start a local one)")
    b.add_argument("--num-cpus", type=int, help="CPUs for a local Ray cluster")
    b.add_argument(
        "--dry-run", action="store_true", help="read and validate every row, load no model, print the plan"
    )
    b.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="the OpenAI-compatible Videos API on Ray Serve")
    _add_model_flags(s)
    s.add_argument("--address", help="Ray cluster address (default: start a local one)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("bench", help="kinoray against a diffusers loop and a one-stage Ray Data job")
    _add_model_flags(k)
    k.add_argument("--rows", type=int, default=24, help="prompts in the bulk comparison")
    k.add_argument("--online-requests", type=int, default=16, help="requests per concurrency level (0: skip)")
    k.add_argument("--out", default="bench-results")
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
    k.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("KINORAY_LOG", "WARNING"))
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

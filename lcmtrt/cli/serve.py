"""`lcmtrt serve` and `lcmtrt bench-serve`: their flags, checks and handlers (the serve extra is imported only here,
and only when one of them runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lcmtrt.cli.args import DEVICE_HELP, bounded, bounded_list, check_report_paths, write_reports
from lcmtrt.errors import UserError

if TYPE_CHECKING:
    from lcmtrt.serve.ray_app import RayConfig


def add_serve_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve bundles over HTTP with the OpenAI Images API")
    serve.add_argument("--engines", action="append", required=True, metavar="[NAME=]DIR",
                       help="a bundle folder; the model id is its folder name unless NAME= is given; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)
    serve.add_argument("--max-n", type=int, default=4, help="images per request at most")
    serve.add_argument("--max-batch-wait-ms", type=float, default=10.0,
                       help="how long a batch waits for requests still on their way to share it "
                            "(a lone request never waits)")
    serve.add_argument("--max-queue", type=int, default=64, help="images waiting per model before 503s")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="request bodies above this get 413")
    serve.add_argument("--request-timeout-s", type=float, default=600.0, help="longest wait for a request's images")
    serve.add_argument("--max-step-programs", type=bounded("max_step_programs"), default=16,
                       help="step programs (buffers, bindings and graphs of one batch size and plan) kept per model; "
                            "the least recently used is freed beyond it (default 16)")
    serve.add_argument("--batch-ms", type=batch_ms_arg, default=None, metavar="SIZE=MS[,SIZE=MS...]",
                       help="the time of a run at each built batch size, which decides how batches are cut into "
                            "launches, instead of timing them at warm-up (e.g. a quiet start's /ready batch_ms); "
                            "for every model")
    serve.add_argument("--api-key", action="append", default=[],
                       help="accept this bearer key (repeatable; also LCMTRT_API_KEY, comma-separated)")
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: the same app on --replicas replicas (pip install 'lcmtrt[ray]')")
    serve.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, each with every bundle "
                       "(default 1)")
    serve.add_argument("--ray-address", help="with --ray: join this Ray cluster (HOST:PORT, ray://HOST:PORT or "
                       "auto) instead of starting a local Ray instance")
    serve.add_argument("--gpus-per-replica", type=float, default=None, help="with --ray: GPUs per replica (0.5 "
                       "puts two on a GPU; default 0)")
    serve.add_argument("--cpus-per-replica", type=float, default=None, help="with --ray: CPUs per replica "
                       "(default 1)")

    bench_serve = commands.add_parser("bench-serve", help="load-test a running `lcmtrt serve` with the openai client")
    bench_serve.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    bench_serve.add_argument("--model", help="model id (default: the server's first)")
    bench_serve.add_argument("--engines", type=Path,
                             help="the same bundle, benched offline in this run for the ratio column")
    bench_serve.add_argument("--concurrency", type=bounded_list("concurrency"), default=(1, 2, 4, 8, 16))
    bench_serve.add_argument("--requests", type=int, default=32, help="requests per concurrency level at most")
    bench_serve.add_argument("--seconds", type=float, default=60.0, help="time per concurrency level at most")
    bench_serve.add_argument("--n", type=int, default=1, help="images per request")
    bench_serve.add_argument("--api-key", default=os.environ.get("LCMTRT_API_KEY", "none"))
    bench_serve.add_argument("--json", type=Path, help="also write the report as JSON")
    bench_serve.add_argument("--plot", type=Path, metavar="FILE.png",
                             help="also draw latency and images/s against concurrency (needs lcmtrt[bench])")
    bench_serve.add_argument("--baseline-url", help="a single-host `lcmtrt serve` of the same bundle: concurrency-1 "
                             "requests alternate between it and --url for the per-request overhead (e.g. Ray's proxy)")


def batch_ms_arg(text: str) -> dict[int, float]:
    """`1=20,2=24`: milliseconds of a run at each batch size (argparse type of --batch-ms)."""
    size, ms = bounded("batch"), bounded("batch_ms")
    costs = {}
    for part in text.split(","):
        left, equals, right = part.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{text!r}: give SIZE=MS pairs separated by commas, e.g. 1=20,2=24")
        costs[int(size(left.strip()))] = float(ms(right.strip()))
    return costs


def _ray_settings(args: argparse.Namespace) -> RayConfig | None:
    """The --ray flags checked (None without --ray); Ray itself is imported only when asked for."""
    ray_flags = {"--replicas": args.replicas, "--ray-address": args.ray_address,
                 "--gpus-per-replica": args.gpus_per_replica, "--cpus-per-replica": args.cpus_per_replica}
    if not args.ray:
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --ray")
        return None
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'lcmtrt[ray]' (or pip install 'ray[serve]')") from None
    from lcmtrt.serve.ray_app import RayConfig

    ray_config = RayConfig(1 if args.replicas is None else args.replicas, args.ray_address,
                           args.gpus_per_replica or 0.0, 1.0 if args.cpus_per_replica is None else args.cpus_per_replica)
    if ray_config.replicas < 1:
        raise UserError(f"--replicas {ray_config.replicas}: give at least 1")
    for flag, value in (("--gpus-per-replica", ray_config.gpus_per_replica),
                        ("--cpus-per-replica", ray_config.cpus_per_replica)):
        if not 0 <= value < float("inf"):
            raise UserError(f"{flag} {value:g}: give a number of at least 0 (fractions share a device)")
    return ray_config


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lcmtrt.serve.app import ServeConfig, parse_models
        from lcmtrt.serve.process import run_server
    except ImportError as e:
        raise UserError(f"serving needs the serve extra: pip install 'lcmtrt[serve]' ({e.name} is missing)") from None
    ray_config = _ray_settings(args)
    if args.max_n < 1 or args.max_queue < 1 or args.max_body_mb <= 0 or args.request_timeout_s <= 0 \
            or args.max_batch_wait_ms < 0:
        raise UserError("--max-n and --max-queue must be at least 1; --max-body-mb and --request-timeout-s "
                        "positive; --max-batch-wait-ms at least 0")
    keys = [*args.api_key, *(k for k in os.environ.get("LCMTRT_API_KEY", "").split(",") if k)]
    config = ServeConfig(parse_models(args.engines), args.host, args.port, args.device, args.max_n,
                         args.max_batch_wait_ms, args.max_queue, args.max_body_mb, args.request_timeout_s,
                         tuple(keys), max_step_programs=int(args.max_step_programs), batch_ms=args.batch_ms)
    if ray_config is not None:
        from lcmtrt.serve.ray_process import run_on_ray

        return run_on_ray(config, ray_config)
    return run_server(config)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    try:
        from lcmtrt.bench.serving import LoadSettings, bench_serve, format_report
    except ImportError as e:
        raise UserError(f"bench-serve needs the openai client: pip install 'lcmtrt[serve]' ({e.name} is missing)") \
            from None
    if args.requests < 1 or args.seconds <= 0 or args.n < 1 or min(args.concurrency) < 1:
        raise UserError("--requests, --n and every --concurrency must be at least 1, --seconds positive")
    check_report_paths(args)
    settings = LoadSettings(args.url, args.model, tuple(args.concurrency), args.requests, args.seconds, args.n,
                            args.api_key, args.baseline_url)
    report = bench_serve(settings, args.engines)
    print(format_report(report))
    write_reports(args, report, _plot_serve)
    return 0


def _plot_serve(report: dict, path: Path) -> None:
    from lcmtrt.bench.plots import plot_serve  # matplotlib only when a plot is asked for

    plot_serve(report, path)

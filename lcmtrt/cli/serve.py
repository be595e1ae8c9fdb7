"""`lcmtrt serve` and `lcmtrt bench-serve`: their flags, checks and handlers (the serve extra is imported only here,
and only when one of them runs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lcmtrt import limits
from lcmtrt.cli.args import add_device_flag, bounded, bounded_list, check_report_paths, write_reports
from lcmtrt.errors import UserError
from lcmtrt.serve.config import check_api_keys, check_ray_settings, check_serve_settings, flag, parse_models

if TYPE_CHECKING:
    from lcmtrt.serve.ray_app import RayConfig


def add_serve_commands(commands: argparse._SubParsersAction) -> None:
    # numbers are taken as text and checked in cmd_serve / cmd_bench_serve against limits.py, with the Ray app
    # builder's arguments (serve/config.py); a flag not given is None there and takes its default
    serve = commands.add_parser("serve", help="serve bundles over HTTP with the OpenAI Images API")
    serve.add_argument("--engines", action="append", required=True, metavar="[NAME=]DIR",
                       help="a bundle folder; the model id is its folder name unless NAME= is given; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default="8000")
    add_device_flag(serve)
    serve.add_argument("--max-n", help="images per request at most (default 4; at most --max-queue)")
    serve.add_argument("--max-batch-wait-ms",
                       help="how long a batch waits for requests to its model still on their way to share it "
                            "(default 10; a lone request never waits)")
    serve.add_argument("--max-queue", help="images waiting per model before 503s (default 64)")
    serve.add_argument("--max-body-mb", help="request bodies above this get 413 (default 20)")
    serve.add_argument("--request-timeout-s", help="longest wait for a request's images (default 600)")
    serve.add_argument("--max-step-programs",
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
    serve.add_argument("--replicas", help="with --ray: replicas, each with every bundle (default 1)")
    serve.add_argument("--ray-address", help="with --ray: join this Ray cluster (HOST:PORT, ray://HOST:PORT or "
                       "auto) instead of starting a local Ray instance")
    serve.add_argument("--gpus-per-replica", help="with --ray: GPUs per replica (0.5 puts two on a GPU; default 0)")
    serve.add_argument("--cpus-per-replica", help="with --ray: CPUs per replica (default 1)")

    bench_serve = commands.add_parser("bench-serve", help="load-test a running `lcmtrt serve` with the openai client")
    bench_serve.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    bench_serve.add_argument("--model", help="model id (default: the server's first)")
    bench_serve.add_argument("--engines", type=Path,
                             help="the same bundle, benched offline in this run for the ratio column")
    bench_serve.add_argument("--concurrency", type=bounded_list("concurrency"), default=(1, 2, 4, 8, 16))
    bench_serve.add_argument("--requests", default="32", help="requests per concurrency level at most")
    bench_serve.add_argument("--seconds", default="60", help="time per concurrency level at most")
    bench_serve.add_argument("--n", default="1", help="images per request")
    bench_serve.add_argument("--api-key", default=os.environ.get("LCMTRT_API_KEY", "none"))
    bench_serve.add_argument("--json", type=Path, help="also write the report as JSON")
    bench_serve.add_argument("--plot", type=Path, metavar="FILE.png",
                             help="also draw latency and images/s against concurrency (needs lcmtrt[bench])")
    bench_serve.add_argument("--baseline-url", help="a single-host `lcmtrt serve` of the same bundle: concurrency-1 "
                             "requests alternate between it and --url for the per-request overhead (e.g. Ray's proxy)")


SERVE_NUMBERS = ("max_n", "max_batch_wait_ms", "max_queue", "max_body_mb", "request_timeout_s", "max_step_programs")
RAY_NUMBERS = ("replicas", "gpus_per_replica", "cpus_per_replica")


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, str]:
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


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
    given = [flag(key) for key in (*RAY_NUMBERS, "ray_address") if getattr(args, key) is not None]
    if not args.ray:
        if given:
            raise UserError(f"{', '.join(given)} only apply with --ray")
        return None
    numbers = check_ray_settings(_given(args, RAY_NUMBERS))
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'lcmtrt[ray]' (or pip install 'ray[serve]')") from None
    from lcmtrt.serve.ray_app import RayConfig

    return RayConfig(numbers["replicas"], args.ray_address, numbers["gpus_per_replica"], numbers["cpus_per_replica"])


def cmd_serve(args: argparse.Namespace) -> int:
    """Every flag checked (serve/config.py, shared with the Ray app builder) before anything is imported or loaded."""
    port = limits.checked_values({"port": args.port}, flag)["port"]
    numbers = check_serve_settings(_given(args, SERVE_NUMBERS))
    keys = check_api_keys([*args.api_key, *(k for k in os.environ.get("LCMTRT_API_KEY", "").split(",") if k)])
    ray_config = _ray_settings(args)
    try:
        from lcmtrt.serve.app import ServeConfig
        from lcmtrt.serve.process import run_server
    except ImportError as e:
        raise UserError(f"serving needs the serve extra: pip install 'lcmtrt[serve]' ({e.name} is missing)") from None
    config = ServeConfig(parse_models(args.engines), args.host, port, args.device, numbers["max_n"],
                         numbers["max_batch_wait_ms"], numbers["max_queue"], numbers["max_body_mb"],
                         numbers["request_timeout_s"], keys, max_step_programs=int(numbers["max_step_programs"]),
                         batch_ms=args.batch_ms)
    if ray_config is not None:
        from lcmtrt.serve.ray_process import run_on_ray

        return run_on_ray(config, ray_config)
    return run_server(config)


def _bench_serve_numbers(args: argparse.Namespace) -> dict[str, float]:
    """--requests, --seconds and --n in their limits.py ranges, and enough requests to keep every level busy."""
    numbers = limits.checked_values({"requests": args.requests, "seconds": args.seconds, "n": args.n}, flag)
    if numbers["requests"] < max(args.concurrency):
        raise UserError(f"--requests {numbers['requests']} cannot keep --concurrency {max(args.concurrency)} busy "
                        f"(each request is sent once); give at least {max(args.concurrency)} requests per level")
    if args.baseline_url is not None and args.baseline_url.rstrip("/") == args.url.rstrip("/"):
        raise UserError("--baseline-url is --url: give a second server (single-host) to compare against")
    return numbers


def cmd_bench_serve(args: argparse.Namespace) -> int:
    numbers = _bench_serve_numbers(args)
    try:
        from lcmtrt.bench.serving import LoadSettings, bench_serve, format_report
    except ImportError as e:
        raise UserError(f"bench-serve needs the openai client: pip install 'lcmtrt[serve]' ({e.name} is missing)") \
            from None
    check_report_paths(args)
    settings = LoadSettings(args.url, args.model, tuple(args.concurrency), numbers["requests"], numbers["seconds"],
                            numbers["n"], args.api_key, args.baseline_url)
    report = bench_serve(settings, args.engines)
    print(format_report(report))
    write_reports(args, report, _plot_serve)
    return 0


def _plot_serve(report: dict, path: Path) -> None:
    from lcmtrt.bench.plots import plot_serve  # matplotlib only when a plot is asked for

    plot_serve(report, path)

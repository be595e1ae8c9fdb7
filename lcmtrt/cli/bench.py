"""`lcmtrt bench`: latency, throughput and memory of a bundle, alternated with its peers in one run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lcmtrt.cli.args import add_device_flag, bounded, bounded_list, check_report_paths, write_reports
from lcmtrt.errors import UserError

log = logging.getLogger("lcmtrt")


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="measure latency, throughput and memory (optionally vs diffusers)")
    bench.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")
    bench.add_argument("--batch", type=bounded_list("batch"), help="batch sizes to measure (default: all built)")
    bench.add_argument("--steps", type=bounded_list("steps"), help="step counts to measure, e.g. 1,2,4 (default: preset's)")
    bench.add_argument("--iterations", type=bounded("iterations"), default=5)
    bench.add_argument("--warmup", type=bounded("warmup"), default=1)
    bench.add_argument("--json", type=Path, help="also write the report as JSON")
    bench.add_argument("--compare", action="append", choices=("diffusers", "optimum-intel"),
                       help="time a peer on the same checkpoint, alternated with lcmtrt in this run; repeatable "
                            "(optimum-intel runs in its own environment: scripts/optimum-intel-env.sh)")
    bench.add_argument("--peer-precision", choices=("fp32", "default"), default="fp32",
                       help="optimum-intel's precision: fp32, or OpenVINO's default (bf16 on CPUs that have it)")
    bench.add_argument("--also", action="append", type=Path, metavar="BUNDLE",
                       help="time another bundle of the same model (e.g. another backend) alternated in this run")
    bench.add_argument("--reference", type=Path, metavar="FP32_BUNDLE",
                       help="report PSNR, max difference and %% of pixels within 1/255 against this fp32 bundle")
    add_device_flag(bench)
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="also draw the report: stage times per compared system, images/s (needs lcmtrt[bench])")


def cmd_bench(args: argparse.Namespace) -> int:
    from lcmtrt.bench.offline import (BenchSettings, DiffusersContender, LcmtrtContender, fidelity,
                                      format_report, run_alternating, speedups)
    from lcmtrt.bundle import load_bundle
    from lcmtrt.runtime.conditioning import condition_images

    check_report_paths(args)
    bundle = load_bundle(args.engines)
    peers = list(dict.fromkeys(args.compare or []))
    if peers and condition_images(bundle):
        raise UserError(f"--compare {peers[0]} does not cover ControlNet or T2I-Adapter bundles yet; "
                        "bench them without --compare")
    if args.reference is not None:
        load_bundle(args.reference)  # a bad reference fails before minutes of timing
    settings = BenchSettings(args.batch or bundle.batch_sizes, args.steps or (bundle.default_steps,),
                             args.iterations, args.warmup)
    log.info("benchmarking %s: batches %s, steps %s, %d iterations%s", args.engines, list(settings.batches),
             list(settings.steps), settings.iterations, f", alternated with {', '.join(peers)}" if peers else "")
    ours = LcmtrtContender(str(args.engines), args.device, settings)
    contenders: list = [ours]
    for other in args.also or []:
        other_bundle = load_bundle(other)
        contenders.append(LcmtrtContender(str(other), "auto", settings,
                                          f"lcmtrt {other_bundle.backend} {other_bundle.precision}"))
    if "diffusers" in peers:
        log.info("loading the diffusers reference ...")
        contenders.append(DiffusersContender(str(args.engines)))
    if "optimum-intel" in peers:
        from lcmtrt.bench.offline import OptimumIntelContender

        log.info("loading optimum-intel's OVLatentConsistencyModelPipeline ...")
        contenders.append(OptimumIntelContender(bundle, settings, args.peer_precision))
    try:
        results = run_alternating(contenders, settings)
    finally:
        for contender in contenders[1:]:
            getattr(contender, "close", lambda: None)()
    report = {"lcmtrt": ours.summary(results["lcmtrt"], settings)}
    for contender in contenders[1:]:
        report[contender.name] = contender.summary(results[contender.name])
    if len(contenders) > 1:
        report["speedup"] = {c.name: speedups(report["lcmtrt"], report[c.name]) for c in contenders[1:]}
    if args.reference is not None:
        report["lcmtrt"]["fidelity"] = fidelity(str(args.engines), str(args.reference), args.device,
                                                settings.batches[0], settings.steps[0])
    elif bundle.precision != "fp32":
        report["lcmtrt"]["fidelity"] = None
        log.warning("warning: a %s bundle: give --reference FP32_BUNDLE to report how close its images are",
                    bundle.precision)
    print(format_report(report))
    write_reports(args, report, _plot_bench)
    return 0


def _plot_bench(report: dict, path: Path) -> None:
    from lcmtrt.bench.plots import plot_bench  # matplotlib only when a plot is asked for

    plot_bench(report, path)

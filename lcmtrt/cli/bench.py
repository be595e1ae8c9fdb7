"""`lcmtrt bench`: latency, throughput and memory of a bundle, alternated with its peers in one run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcmtrt.cli.args import (add_device_flag, add_sampler_flags, bounded, bounded_list, check_report_paths,
                             write_reports)
from lcmtrt.errors import UserError

if TYPE_CHECKING:
    from lcmtrt.bundle import Bundle
    from lcmtrt.runtime.scheduler import SamplerChoice

log = logging.getLogger("lcmtrt")
OPENVINO_PEERS = ("optimum-intel", "openvino-genai")  # the peers of scripts/optimum-intel-env.sh's venv


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="measure latency, throughput and memory (optionally vs diffusers)")
    bench.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")
    bench.add_argument("--batch", type=bounded_list("batch"), help="batch sizes to measure (default: all built)")
    bench.add_argument("--steps", type=bounded_list("steps"),
                       help="step counts to measure, e.g. 1,2,4 (default: preset's, or as many as --timesteps)")
    add_sampler_flags(bench)
    bench.add_argument("--iterations", type=bounded("iterations"), default=5)
    bench.add_argument("--warmup", type=bounded("warmup"), default=1)
    bench.add_argument("--json", type=Path, help="also write the report as JSON")
    bench.add_argument("--compare", action="append", choices=("diffusers",) + OPENVINO_PEERS,
                       help="time a peer on the same checkpoint, alternated with lcmtrt in this run; repeatable "
                            "(optimum-intel and openvino-genai run in their own environment: "
                            "scripts/optimum-intel-env.sh)")
    bench.add_argument("--peer-precision", choices=("fp32", "default"), default="fp32",
                       help="optimum-intel's and openvino-genai's precision: fp32, or OpenVINO's default (bf16 on "
                            "CPUs that have it)")
    bench.add_argument("--peer-fidelity", action="store_true",
                       help="with --peer-precision default: also compare each OpenVINO peer's images with its own "
                            "fp32 ones (PSNR, max difference, %% within 1/255)")
    bench.add_argument("--also", action="append", type=Path, metavar="BUNDLE",
                       help="time another bundle of the same model (e.g. another backend) alternated in this run")
    bench.add_argument("--reference", type=Path, metavar="FP32_BUNDLE",
                       help="report PSNR, max difference and %% of pixels within 1/255 against this fp32 bundle")
    add_device_flag(bench)
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="also draw the report: stage times per compared system, images/s (needs lcmtrt[bench])")


def cmd_bench(args: argparse.Namespace) -> int:
    from lcmtrt.bench.offline import BenchSettings, fidelity, format_report, run_alternating, speedups
    from lcmtrt.bundle import load_bundle
    from lcmtrt.runtime.conditioning import condition_images

    check_report_paths(args)
    bundle = load_bundle(args.engines)
    peers = list(dict.fromkeys(args.compare or []))
    samplers = _samplers(args, bundle)
    _check_peers_run(peers, samplers[0])
    if peers and condition_images(bundle):
        raise UserError(f"--compare {peers[0]} does not cover ControlNet or T2I-Adapter bundles yet; "
                        "bench them without --compare")
    if peers and bundle.inpaint == "unet9":  # the peers time text-to-image, which a 9-channel UNet cannot run
        raise UserError(f"--compare {peers[0]} does not cover inpainting bundles yet; bench them without --compare")
    if args.peer_fidelity and (args.peer_precision != "default" or not set(peers) & set(OPENVINO_PEERS)):
        raise UserError("--peer-fidelity compares an OpenVINO peer's default precision with its fp32: give it with "
                        f"--peer-precision default and --compare {' or --compare '.join(OPENVINO_PEERS)}")
    for peer in [p for p in peers if p in OPENVINO_PEERS]:  # a bundle no peer can reproduce fails before loading
        from lcmtrt.bench.peers.optimum_intel import peer_checkpoint

        peer_checkpoint(bundle, peer)
    if args.reference is not None:
        load_bundle(args.reference)  # a bad reference fails before minutes of timing
    settings = BenchSettings(args.batch or bundle.batch_sizes, tuple(s.steps for s in samplers), args.iterations,
                             args.warmup, samplers)
    log.info("benchmarking %s: %s, batches %s, steps %s, %d iterations%s", args.engines, samplers[0].name,
             list(settings.batches), list(settings.steps), settings.iterations,
             f", alternated with {', '.join(peers)}" if peers else "")
    contenders = _load_contenders(args, bundle, peers, settings)
    ours = contenders[0]
    peer_fidelity = {}
    try:
        results = run_alternating(contenders, settings)
        if args.peer_fidelity:
            for contender in contenders[1:]:
                if contender.name in OPENVINO_PEERS:
                    log.info("comparing %s's %s images with its fp32 ones ...", contender.name, args.peer_precision)
                    peer_fidelity[contender.name] = contender.fidelity(settings.batches[0], settings.steps[0])
    finally:
        for contender in contenders[1:]:
            getattr(contender, "close", lambda: None)()
    report = {"lcmtrt": ours.summary(results["lcmtrt"], settings)}
    for contender in contenders[1:]:
        report[contender.name] = contender.summary(results[contender.name])
        if contender.name in peer_fidelity:
            report[contender.name]["fidelity"] = peer_fidelity[contender.name]
    if len(contenders) > 1:
        report["speedup"] = {c.name: speedups(report["lcmtrt"], report[c.name]) for c in contenders[1:]}
    if args.reference is not None:
        report["lcmtrt"]["fidelity"] = fidelity(str(args.engines), str(args.reference), args.device, settings)
    elif bundle.precision != "fp32":
        report["lcmtrt"]["fidelity"] = None
        log.warning("warning: a %s bundle: give --reference FP32_BUNDLE to report how close its images are",
                    bundle.precision)
    print(format_report(report))
    write_reports(args, report, _plot_bench)
    return 0


def _samplers(args: argparse.Namespace, bundle: Bundle) -> tuple[SamplerChoice, ...]:
    """The sampler timed at each step count, resolved and refused as infer's (the bundle's by default, with its
    preset's eta and timesteps); --timesteps alone gives the step count."""
    from lcmtrt.runtime.scheduler import choose_sampler

    samplers = tuple(choose_sampler(bundle, args.scheduler, steps, args.timesteps, args.eta, None, False)
                     for steps in args.steps or (None,))
    for sampler in samplers:
        sampler.plan(bundle.scheduler)  # the plan's own refusals (DDIM takes no custom timesteps) before any loading
    return samplers


def _check_peers_run(peers: list[str], sampler: SamplerChoice) -> None:
    """The peers run diffusers' LCM pipelines (LCMScheduler): a bench of another sampler would time them on a
    different schedule."""
    if not peers:
        return
    if sampler.name != "lcm":
        raise UserError(f"--compare {peers[0]} runs LCMScheduler only; bench --scheduler {sampler.name} without "
                        "--compare")
    custom = [p for p in peers if p in OPENVINO_PEERS] if sampler.timesteps else []
    if custom:
        raise UserError(f"--compare {custom[0]} takes no custom timesteps; bench --timesteps without it")


def _load_contenders(args: argparse.Namespace, bundle: Any, peers: list[str], settings: Any) -> list[Any]:
    """lcmtrt on --engines first, then each --also bundle, then the peers in the order given; on a failure the
    peers already started are stopped."""
    from lcmtrt.bench.offline import DiffusersContender, LcmtrtContender, OpenVinoPeerContender
    from lcmtrt.bundle import load_bundle

    seen = [Path(args.engines).resolve()]
    for other in args.also or []:  # one bundle twice would be one row timed twice (results are keyed by row name)
        if Path(other).resolve() in seen:
            raise UserError(f"--also {other} is already being benchmarked; give each bundle once")
        seen.append(Path(other).resolve())
    contenders: list[Any] = [LcmtrtContender(str(args.engines), args.device, settings)]
    try:
        for other in args.also or []:
            other_bundle = load_bundle(other)
            name = f"lcmtrt {other_bundle.backend} {other_bundle.precision}"
            if name in (c.name for c in contenders):  # another bundle of that backend and precision: its own row
                name += f" ({other})"
            contenders.append(LcmtrtContender(str(other), "auto", settings, name))
        for peer in peers:
            if peer == "diffusers":
                log.info("loading the diffusers reference ...")
                contenders.append(DiffusersContender(str(args.engines), settings))
            else:
                log.info("loading the %s peer (%s precision) ...", peer, args.peer_precision)
                contenders.append(OpenVinoPeerContender(peer, bundle, settings, args.peer_precision))
    except BaseException:
        for contender in contenders[1:]:
            getattr(contender, "close", lambda: None)()
        raise
    return contenders


def _plot_bench(report: dict, path: Path) -> None:
    from lcmtrt.bench.plots import plot_bench  # matplotlib only when a plot is asked for

    plot_bench(report, path)

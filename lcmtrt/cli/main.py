"""The `lcmtrt` command: build-engines, infer, bench, verify, presets (serve and bench-serve in serve_cli.py). User
mistakes print one line and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from lcmtrt.runtime.cli_args import DEVICE_HELP, bounded, bounded_list, check_report_paths, probe_writable, write_reports
from lcmtrt.runtime.serve_cli import add_serve_commands, cmd_bench_serve, cmd_serve
from lcmtrt.runtime.errors import UserError

log = logging.getLogger("lcmtrt")
GRID_LIMIT = 64  # a grid is one image held in memory: beyond this, one file per image
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seeds(text: str) -> int | list[int]:
    seeds = list(bounded_list("seed")(text))
    return seeds[0] if len(seeds) == 1 else seeds


def _pair(text: str) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers like 1024,1024, got {text!r}") from None
    return first, second


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lcmtrt", description="TensorRT-compiled Latent Consistency Models")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    build = commands.add_parser("build-engines", help="export a model and build its engine bundle")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in preset (see `lcmtrt presets`)")
    source.add_argument("--config", help="a preset TOML file")
    source.add_argument("--from", dest="source_bundle", type=Path, metavar="BUNDLE",
                        help="reuse this bundle's ONNX graphs: engines for another --backend / --precision, no export")
    build.add_argument("--model", help="hub id or local diffusers folder replacing the preset's model")
    build.add_argument("--out", type=Path, help="bundle folder (default: artifacts/<preset>)")
    build.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "openvino"), default="auto",
                       help="auto: TensorRT on a GPU with it, ONNX Runtime CUDA on another GPU, else OpenVINO when "
                            "installed, else ONNX Runtime CPU")
    build.add_argument("--precision", choices=("fp16", "fp32", "bf16"),
                       help="default: fp16 on a GPU, fp32 on a CPU; bf16: OpenVINO on CPUs with avx512_bf16 or AMX")
    build.add_argument("--device", default="CPU", help="OpenVINO device the bundle targets: CPU, GPU, NPU, ...")
    build.add_argument("--height", type=bounded("height"))
    build.add_argument("--width", type=bounded("width"))
    build.add_argument("--batch", type=bounded_list("batch"), help="batch sizes to build, e.g. 1,4")
    build.add_argument("--workspace-gb", type=bounded("workspace_gb"), help="TensorRT builder workspace limit")
    build.add_argument("--lora", action="append", default=[], metavar="ID_OR_FILE[:WEIGHT]",
                       help="fuse a LoRA (.safetensors; hub id, file or folder), added to the preset's; repeatable")
    build.add_argument("--controlnet", help="hub id or folder of a ControlNet replacing the preset's")
    build.add_argument("--adapter", help="hub id or folder of a T2I-Adapter replacing the preset's")
    build.add_argument("--refittable", action="store_true",
                       help="keep LoRA-touchable weights replaceable, for `infer --lora` without a rebuild")
    build.add_argument("--cfg", action="store_true",
                       help="also build classifier-free guidance (UNets without a guidance embedding, e.g. LCM-LoRA)")

    infer = commands.add_parser("infer", help="generate images from a bundle")
    infer.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")
    infer.add_argument("prompt", nargs="+", help="one image per prompt (times --num-images)")
    infer.add_argument("--negative-prompt", default="")
    infer.add_argument("--num-images", type=bounded("num_images"), default=1, help="images per prompt")
    infer.add_argument("--seed", type=_seeds, help="one seed for the batch, or one per image (comma-separated)")
    infer.add_argument("--steps", type=bounded("steps"))
    infer.add_argument("--guidance-scale", type=bounded("guidance_scale"))
    infer.add_argument("--original-inference-steps", type=bounded("original_inference_steps"))
    infer.add_argument("--output", type=Path, default=Path("output.png"),
                       help="image path; several images get -0, -1, ... before the suffix")
    infer.add_argument("--grid", action="store_true", help="save all images as one grid (inputs first)")
    infer.add_argument("--image", action="append", type=Path,
                       help="image-to-image input: once for all prompts, or once per image")
    infer.add_argument("--strength", type=bounded("strength"), default=0.8, help="image-to-image strength in (0, 1]")
    infer.add_argument("--img2img-mode", choices=("classic", "lcm"), default="classic",
                       help="classic: drop the first steps (AutoPipelineForImage2Image); lcm: all steps, shorter "
                            "schedule (LatentConsistencyModelImg2ImgPipeline)")
    infer.add_argument("--fit", choices=("stretch", "crop"), default="stretch",
                       help="how an input image of another size is fitted (stretch: as diffusers)")
    infer.add_argument("--device", default="auto", help=DEVICE_HELP)
    infer.add_argument("--control-image", action="append", type=Path,
                       help="ControlNet bundles: a ready control map (or a photo with --canny), once or once per image")
    infer.add_argument("--canny", nargs="?", const=(100, 200), type=_pair, metavar="LOW,HIGH",
                       help="compute the canny map of --control-image with OpenCV (default thresholds 100,200)")
    infer.add_argument("--control-scale", type=bounded("control_scale"), default=1.0, help="ControlNet conditioning scale")
    infer.add_argument("--control-start", type=bounded("control_start"), default=0.0, help="diffusers' control_guidance_start")
    infer.add_argument("--control-end", type=bounded("control_end"), default=1.0, help="diffusers' control_guidance_end")
    infer.add_argument("--save-control", type=Path, help="write the control map used (first one)")
    infer.add_argument("--adapter-scale", type=bounded("adapter_scale"), default=1.0, help="T2I-Adapter conditioning scale")
    infer.add_argument("--adapter-factor", type=bounded("adapter_factor"), default=1.0,
                       help="fraction of the steps the T2I-Adapter conditions (diffusers' adapter_conditioning_factor)")
    infer.add_argument("--lora", action="append", metavar="ID_OR_FILE[:WEIGHT]",
                       help="use this LoRA set instead of the bundle's (refittable bundles); repeatable; "
                            "--lora none for the base model")
    infer.add_argument("--original-size", type=_pair, metavar="H,W", help="SDXL micro-conditioning (default: H,W)")
    infer.add_argument("--crop-top-left", type=_pair, metavar="TOP,LEFT", default=(0, 0),
                       help="SDXL micro-conditioning (default: 0,0)")
    infer.add_argument("--target-size", type=_pair, metavar="H,W", help="SDXL micro-conditioning (default: H,W)")

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
    bench.add_argument("--device", default="auto", help=DEVICE_HELP)
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="also draw the report: stage times per compared system, images/s (needs lcmtrt[bench])")

    verify = commands.add_parser("verify", help="hash every file of a bundle against bundle.json")
    verify.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")

    commands.add_parser("presets", help="list the built-in presets")

    add_serve_commands(commands)
    return parser


def _output_paths(output: Path, count: int, grid: bool) -> Callable[[int], Path]:
    """The path of image i, after checking the folder can take them."""
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--output {output}: unknown image type; use one of {', '.join(IMAGE_SUFFIXES)}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--output {output}: folder {parent} does not exist")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give an image file name")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise UserError(f"--output {output}: not writable")
    probe_writable(parent, f"--output {output}")
    if count == 1 or grid:
        return lambda i: output
    return lambda i: output.with_name(f"{output.stem}-{i}{output.suffix}")  # named on demand: a million is fine


def _save(image, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written image on failure or interruption."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
        image.save(tmp, format=IMAGE_SUFFIXES[path.suffix.lower()])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the image the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or str(e).splitlines()[0]}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def grid_image(images):
    """Images side by side in rows of up to four, like diffusers' make_image_grid."""
    from PIL import Image

    count, height, width = len(images), images[0].shape[0], images[0].shape[1]
    cols = min(count, 4)
    rows = -(-count // cols)
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % cols) * width, (i // cols) * height))
    return grid


def cmd_build(args: argparse.Namespace) -> int:
    from lcmtrt.engines.build import build_bundle, convert_bundle
    from lcmtrt.engines.preset import load_preset

    if args.source_bundle is not None:
        given = [f for f in ("model", "height", "width", "controlnet", "adapter") if getattr(args, f)]
        if given or args.lora or args.cfg or args.refittable:
            raise UserError(f"--from reuses a bundle's ONNX graphs as they are; --{(given or ['lora/cfg/refittable'])[0]} "
                            "needs a new export (--preset or --config)")
        out = args.out or Path("artifacts") / f"{args.source_bundle.name}-{args.backend}-{args.precision or 'default'}"
        convert_bundle(args.source_bundle, out, backend=args.backend, precision=args.precision,
                       workspace_gb=args.workspace_gb, device=args.device, batch_sizes=args.batch)
        print(out)
        return 0

    from dataclasses import replace

    preset = load_preset(args.preset, args.config)
    if args.model:  # a whole checkpoint of the user's: its own UNet and VAE, not the preset's replacements
        preset = replace(preset, model=args.model, unet=None, vae=None)
    from lcmtrt.export.lora import LoraSpec

    preset = preset.with_overrides(height=args.height, width=args.width, batch_sizes=args.batch,
                                   loras=preset.loras + tuple(LoraSpec.parse(text) for text in args.lora) or None,
                                   cfg=args.cfg or None, controlnet=args.controlnet,
                                   adapter=args.adapter)
    out = args.out or Path("artifacts") / preset.name
    build_bundle(preset, out, backend=args.backend, precision=args.precision, workspace_gb=args.workspace_gb,
                 refittable=args.refittable, device=args.device)
    print(out)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from PIL import Image

    from lcmtrt.runtime.pipeline import Pipeline

    from lcmtrt.runtime.images import canny_map, fit_image, load_image

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    if args.grid and len(prompts) > GRID_LIMIT:
        raise UserError(f"--grid shows at most {GRID_LIMIT} images ({len(prompts)} asked); drop --grid to write "
                        "each image to its own file")
    paths = _output_paths(args.output, len(prompts), args.grid)
    if args.image and len(args.image) not in (1, len(prompts)):
        raise UserError(f"{len(args.image)} --image inputs for {len(prompts)} images; give one or one per image")
    sources = [load_image(path) for path in args.image or []]
    controls = [load_image(path) for path in args.control_image or []]
    if args.canny:
        controls = [canny_map(image, *args.canny) for image in controls]
    if args.save_control is not None:
        _output_paths(args.save_control, 1, False)
        if not controls:
            raise UserError("--save-control needs --control-image")
    start = time.perf_counter()
    pipeline = Pipeline.load(args.engines, args.device)
    if args.lora:
        from lcmtrt.export.lora import LoraSpec

        pipeline.apply_loras([LoraSpec.parse(text) for text in args.lora if text != "none"])
    loaded = time.perf_counter()
    inputs = [fit_image(image, pipeline.bundle.width, pipeline.bundle.height, args.fit) for image in sources]
    # control maps are resized as diffusers' control and adapter preprocessing do (Lanczos to the bundle's size);
    # a T2I-Adapter takes them with its own channel count (1: grayscale)
    size = (pipeline.bundle.width, pipeline.bundle.height)
    control_maps = [fit_image(image, *size) for image in controls]
    adapter = pipeline.bundle.engines.get("adapter")
    adapter_maps = None
    if adapter is not None and controls:
        gray = adapter.inputs[0].shape[-1] == 1
        adapter_maps = [fit_image(image.convert("L"), *size)[..., None] if gray else fit_image(image, *size)
                        for image in controls]
        control_maps, shown = [], [fit_image(image, *size) for image in controls]
    else:
        shown = control_maps
    sdxl_flags = [f for f in ("original_size", "target_size") if getattr(args, f)] + (
        ["crop_top_left"] if args.crop_top_left != (0, 0) else [])
    if sdxl_flags and pipeline.bundle.family != "sdxl":
        log.warning("warning: --%s only conditions SDXL-class models; ignored", sdxl_flags[0].replace("_", "-"))
    settings = dict(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        original_inference_steps=args.original_inference_steps,
        negative_prompts=[args.negative_prompt] if args.negative_prompt else None,
        images=inputs or None,
        strength=args.strength,
        img2img_mode=args.img2img_mode,
        original_size=args.original_size,
        crop_top_left=args.crop_top_left,
        target_size=args.target_size,
        control_images=control_maps or None,
        control_scale=args.control_scale,
        control_start=args.control_start,
        control_end=args.control_end,
        adapter_images=adapter_maps,
        adapter_scale=args.adapter_scale,
        adapter_factor=args.adapter_factor,
    )
    if args.save_control is not None:
        _save(Image.fromarray(shown[0]), args.save_control)
    # each engine batch's images are written as soon as they exist: memory stays bounded whatever --num-images is
    written, grid, result = 0, [], None
    for result in pipeline.generate_pieces(prompts, seed=args.seed, **settings):
        if args.grid:
            grid += list(result.images)
        else:
            for image in result.images:
                _save(Image.fromarray(image), paths(written))
                print(paths(written))
                written += 1
            if written < len(prompts):
                elapsed = time.perf_counter() - loaded
                log.info("%d/%d images written, %.1f s elapsed, about %.0f s left", written, len(prompts), elapsed,
                         elapsed / written * (len(prompts) - written))
    done = time.perf_counter()
    if args.grid:
        _save(grid_image(inputs + shown + grid), paths(0))
        print(paths(0))
    log.info("%d image(s) %dx%d, seed %s, timesteps %s, noise from %s; load %.2f s, generate %.2f s",
             len(prompts), pipeline.bundle.width, pipeline.bundle.height, result.seeds, result.timesteps,
             result.noise, loaded - start, done - loaded)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lcmtrt.runtime.bench import (BenchSettings, DiffusersContender, LcmtrtContender, condition_images, fidelity,
                                      format_report, run_alternating, speedups)
    from lcmtrt.runtime.bundle import load_bundle

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
        from lcmtrt.runtime.bench import OptimumIntelContender

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
    from lcmtrt.runtime.plots import plot_bench  # matplotlib only when a plot is asked for

    plot_bench(report, path)


def cmd_verify(args: argparse.Namespace) -> int:
    from lcmtrt.runtime.bundle import verify_bundle

    start = time.perf_counter()
    bundle, problems = verify_bundle(args.engines)
    if problems:
        for line in problems:
            print(f"lcmtrt: damaged: {line}", file=sys.stderr)
        raise UserError(f"{len(problems)} damaged file(s) in {args.engines}; rebuild it with `lcmtrt build-engines`")
    total = sum(d["size"] for d in bundle.files.values())
    print(f"{args.engines}: {len(bundle.files)} files, {total / 2**30:.2f} GiB, all match bundle.json "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lcmtrt.engines.preset import load_preset, preset_names

    for name in preset_names():
        print(f"{name:24s} {load_preset(name).description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lcmtrt")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    root.propagate = False
    commands = {"build-engines": cmd_build, "infer": cmd_infer, "bench": cmd_bench, "verify": cmd_verify,
                "presets": cmd_presets, "serve": cmd_serve, "bench-serve": cmd_bench_serve}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"lcmtrt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what the file system refused that no check above foresaw (name too long, disk full, ...)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lcmtrt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcmtrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

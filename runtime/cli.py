"""The `lcmtrt` command: build-engines, infer, presets. User mistakes print one line and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lcmtrt.runtime import limits
from lcmtrt.runtime.errors import UserError

if TYPE_CHECKING:
    from lcmtrt.runtime.serve_ray import RayConfig

log = logging.getLogger("lcmtrt")
GRID_LIMIT = 64  # a grid is one image held in memory: beyond this, one file per image
DEVICE_HELP = "auto (the bundle's), ONNX Runtime's cpu or cuda, or an OpenVINO device (CPU, GPU, NPU, ...)"
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded(name: str) -> Callable[[str], float]:
    """An argparse type: the number must lie in limits.LIMITS[name] (finite, in range), else a one-line error."""
    def parse(text: str) -> float:
        try:
            return limits.parse(name, text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _bounded_list(name: str) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers, each in limits.LIMITS[name]."""
    one = _bounded(name)

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(one(part)) for part in text.split(","))

    parse.__name__ = name
    return parse


def _seeds(text: str) -> int | list[int]:
    seeds = list(_bounded_list("seed")(text))
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
    build.add_argument("--height", type=_bounded("height"))
    build.add_argument("--width", type=_bounded("width"))
    build.add_argument("--batch", type=_bounded_list("batch"), help="batch sizes to build, e.g. 1,4")
    build.add_argument("--workspace-gb", type=_bounded("workspace_gb"), help="TensorRT builder workspace limit")
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
    infer.add_argument("--num-images", type=_bounded("num_images"), default=1, help="images per prompt")
    infer.add_argument("--seed", type=_seeds, help="one seed for the batch, or one per image (comma-separated)")
    infer.add_argument("--steps", type=_bounded("steps"))
    infer.add_argument("--guidance-scale", type=_bounded("guidance_scale"))
    infer.add_argument("--original-inference-steps", type=_bounded("original_inference_steps"))
    infer.add_argument("--output", type=Path, default=Path("output.png"),
                       help="image path; several images get -0, -1, ... before the suffix")
    infer.add_argument("--grid", action="store_true", help="save all images as one grid (inputs first)")
    infer.add_argument("--image", action="append", type=Path,
                       help="image-to-image input: once for all prompts, or once per image")
    infer.add_argument("--strength", type=_bounded("strength"), default=0.8, help="image-to-image strength in (0, 1]")
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
    infer.add_argument("--control-scale", type=_bounded("control_scale"), default=1.0, help="ControlNet conditioning scale")
    infer.add_argument("--control-start", type=_bounded("control_start"), default=0.0, help="diffusers' control_guidance_start")
    infer.add_argument("--control-end", type=_bounded("control_end"), default=1.0, help="diffusers' control_guidance_end")
    infer.add_argument("--save-control", type=Path, help="write the control map used (first one)")
    infer.add_argument("--adapter-scale", type=_bounded("adapter_scale"), default=1.0, help="T2I-Adapter conditioning scale")
    infer.add_argument("--adapter-factor", type=_bounded("adapter_factor"), default=1.0,
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
    bench.add_argument("--batch", type=_bounded_list("batch"), help="batch sizes to measure (default: all built)")
    bench.add_argument("--steps", type=_bounded_list("steps"), help="step counts to measure, e.g. 1,2,4 (default: preset's)")
    bench.add_argument("--iterations", type=_bounded("iterations"), default=5)
    bench.add_argument("--warmup", type=_bounded("warmup"), default=1)
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
    bench_serve.add_argument("--concurrency", type=_bounded_list("concurrency"), default=(1, 2, 4, 8, 16))
    bench_serve.add_argument("--requests", type=int, default=32, help="requests per concurrency level at most")
    bench_serve.add_argument("--seconds", type=float, default=60.0, help="time per concurrency level at most")
    bench_serve.add_argument("--n", type=int, default=1, help="images per request")
    bench_serve.add_argument("--api-key", default=os.environ.get("LCMTRT_API_KEY", "none"))
    bench_serve.add_argument("--json", type=Path, help="also write the report as JSON")
    bench_serve.add_argument("--plot", type=Path, metavar="FILE.png",
                             help="also draw latency and images/s against concurrency (needs lcmtrt[bench])")
    bench_serve.add_argument("--baseline-url", help="a single-host `lcmtrt serve` of the same bundle: concurrency-1 "
                             "requests alternate between it and --url for the per-request overhead (e.g. Ray's proxy)")
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
    _probe_writable(parent, f"--output {output}")
    if count == 1 or grid:
        return lambda i: output
    return lambda i: output.with_name(f"{output.stem}-{i}{output.suffix}")  # named on demand: a million is fine


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: access() says yes for root on /proc and read-only mounts, and finding
    out after minutes of generation would be too late."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lcmtrt-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


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
    import json

    from lcmtrt.runtime.bench import (BenchSettings, DiffusersContender, LcmtrtContender, condition_images, fidelity,
                                      format_report, run_alternating, speedups)
    from lcmtrt.runtime.bundle import load_bundle

    _check_report_paths(args)
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
    if args.json is not None:
        _write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot is not None:
        from lcmtrt.runtime.plots import plot_bench

        plot_bench(report, args.plot)
    return 0


def _check_report_paths(args: argparse.Namespace) -> None:
    """--json and --plot must be writable files (and --plot drawable) before minutes of measuring."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        if not path.parent.is_dir():
            raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        _probe_writable(path.parent, f"{flag} {path}")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            raise UserError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
        from lcmtrt.runtime.plots import require_matplotlib

        require_matplotlib()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    from lcmtrt.runtime.serve_ray import RayConfig

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
        from lcmtrt.runtime.serve import ServeConfig, parse_models
        from lcmtrt.runtime.serve_process import run_server
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
                         tuple(keys))
    if ray_config is not None:
        from lcmtrt.runtime.serve_ray_process import run_on_ray

        return run_on_ray(config, ray_config)
    return run_server(config)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    try:
        from lcmtrt.runtime.bench_serve import LoadSettings, bench_serve, format_report
    except ImportError as e:
        raise UserError(f"bench-serve needs the openai client: pip install 'lcmtrt[serve]' ({e.name} is missing)") \
            from None
    if args.requests < 1 or args.seconds <= 0 or args.n < 1 or min(args.concurrency) < 1:
        raise UserError("--requests, --n and every --concurrency must be at least 1, --seconds positive")
    _check_report_paths(args)
    settings = LoadSettings(args.url, args.model, tuple(args.concurrency), args.requests, args.seconds, args.n,
                            args.api_key, args.baseline_url)
    report = bench_serve(settings, args.engines)
    print(format_report(report))
    if args.json is not None:
        import json

        _write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot is not None:
        from lcmtrt.runtime.plots import plot_serve

        plot_serve(report, args.plot)
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

"""The `lcmtrt` command: build-engines, infer, presets. User mistakes print one line and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from lcmtrt.runtime.errors import UserError

log = logging.getLogger("lcmtrt")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated integers, got {text!r}") from None
    return sizes


def _seeds(text: str) -> int | list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes an integer or comma-separated integers, got {text!r}") from None
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
    build.add_argument("--model", help="hub id or local diffusers folder replacing the preset's model")
    build.add_argument("--out", type=Path, help="bundle folder (default: artifacts/<preset>)")
    build.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto")
    build.add_argument("--precision", choices=("fp16", "fp32"), help="default: fp16 on a GPU, fp32 on a CPU")
    build.add_argument("--height", type=int)
    build.add_argument("--width", type=int)
    build.add_argument("--batch", type=_batch_list, help="batch sizes to build, e.g. 1,4")
    build.add_argument("--workspace-gb", type=float, help="TensorRT builder workspace limit")
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
    infer.add_argument("--num-images", type=int, default=1, help="images per prompt")
    infer.add_argument("--seed", type=_seeds, help="one seed for the batch, or one per image (comma-separated)")
    infer.add_argument("--steps", type=int)
    infer.add_argument("--guidance-scale", type=float)
    infer.add_argument("--original-inference-steps", type=int)
    infer.add_argument("--output", type=Path, default=Path("output.png"),
                       help="image path; several images get -0, -1, ... before the suffix")
    infer.add_argument("--grid", action="store_true", help="save all images as one grid (inputs first)")
    infer.add_argument("--image", action="append", type=Path,
                       help="image-to-image input: once for all prompts, or once per image")
    infer.add_argument("--strength", type=float, default=0.8, help="image-to-image strength in (0, 1]")
    infer.add_argument("--img2img-mode", choices=("classic", "lcm"), default="classic",
                       help="classic: drop the first steps (AutoPipelineForImage2Image); lcm: all steps, shorter "
                            "schedule (LatentConsistencyModelImg2ImgPipeline)")
    infer.add_argument("--fit", choices=("stretch", "crop"), default="stretch",
                       help="how an input image of another size is fitted (stretch: as diffusers)")
    infer.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime provider")
    infer.add_argument("--control-image", action="append", type=Path,
                       help="ControlNet bundles: a ready control map (or a photo with --canny), once or once per image")
    infer.add_argument("--canny", nargs="?", const=(100, 200), type=_pair, metavar="LOW,HIGH",
                       help="compute the canny map of --control-image with OpenCV (default thresholds 100,200)")
    infer.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    infer.add_argument("--control-start", type=float, default=0.0, help="diffusers' control_guidance_start")
    infer.add_argument("--control-end", type=float, default=1.0, help="diffusers' control_guidance_end")
    infer.add_argument("--save-control", type=Path, help="write the control map used (first one)")
    infer.add_argument("--adapter-scale", type=float, default=1.0, help="T2I-Adapter conditioning scale")
    infer.add_argument("--adapter-factor", type=float, default=1.0,
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
    bench.add_argument("--batch", type=_batch_list, help="batch sizes to measure (default: all built)")
    bench.add_argument("--steps", type=_batch_list, help="step counts to measure, e.g. 1,2,4 (default: preset's)")
    bench.add_argument("--iterations", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--json", type=Path, help="also write the report as JSON")
    bench.add_argument("--compare", choices=("diffusers",), help="run the diffusers reference in the same run")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime provider")

    commands.add_parser("presets", help="list the built-in presets")

    serve = commands.add_parser("serve", help="serve bundles over HTTP with the OpenAI Images API")
    serve.add_argument("--engines", action="append", required=True, metavar="[NAME=]DIR",
                       help="a bundle folder; the model id is its folder name unless NAME= is given; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime provider")
    serve.add_argument("--max-n", type=int, default=4, help="images per request at most")
    serve.add_argument("--max-batch-wait-ms", type=float, default=10.0,
                       help="how long a request waits for others to share its engine batch")
    serve.add_argument("--max-queue", type=int, default=64, help="images waiting per model before 503s")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="request bodies above this get 413")
    serve.add_argument("--request-timeout-s", type=float, default=600.0, help="longest wait for a request's images")
    serve.add_argument("--api-key", action="append", default=[],
                       help="accept this bearer key (repeatable; also LCMTRT_API_KEY, comma-separated)")

    bench_serve = commands.add_parser("bench-serve", help="load-test a running `lcmtrt serve` with the openai client")
    bench_serve.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    bench_serve.add_argument("--model", help="model id (default: the server's first)")
    bench_serve.add_argument("--engines", type=Path,
                             help="the same bundle, benched offline in this run for the ratio column")
    bench_serve.add_argument("--concurrency", type=_batch_list, default=(1, 2, 4, 8, 16))
    bench_serve.add_argument("--requests", type=int, default=32, help="requests per concurrency level at most")
    bench_serve.add_argument("--seconds", type=float, default=60.0, help="time per concurrency level at most")
    bench_serve.add_argument("--n", type=int, default=1, help="images per request")
    bench_serve.add_argument("--api-key", default=os.environ.get("LCMTRT_API_KEY", "none"))
    bench_serve.add_argument("--json", type=Path, help="also write the report as JSON")
    return parser


def _output_paths(output: Path, count: int, grid: bool) -> list[Path]:
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--output {output}: unknown image type; use one of {', '.join(IMAGE_SUFFIXES)}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--output {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise UserError(f"--output {output}: not writable")
    if count == 1 or grid:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _save(image, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written image on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        image.save(tmp, format=IMAGE_SUFFIXES[path.suffix.lower()])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the image the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

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
                 refittable=args.refittable)
    print(out)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from PIL import Image

    from lcmtrt.runtime.pipeline import Pipeline

    if args.num_images < 1:
        raise UserError(f"--num-images {args.num_images} must be at least 1")
    from lcmtrt.runtime.images import canny_map, fit_image, load_image

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
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
    result = pipeline.generate(
        prompts,
        seed=args.seed,
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
    done = time.perf_counter()
    if args.save_control is not None:
        _save(Image.fromarray(shown[0]), args.save_control)
    if args.grid:
        images = [grid_image(inputs + shown + list(result.images))]
    else:
        images = [Image.fromarray(i) for i in result.images]
    for image, path in zip(images, paths):
        _save(image, path)
        print(path)
    log.info("%d image(s) %dx%d, seed %s, timesteps %s, noise from %s; load %.2f s, generate %.2f s",
             len(prompts), pipeline.bundle.width, pipeline.bundle.height, result.seeds, result.timesteps,
             result.noise, loaded - start, done - loaded)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from lcmtrt.runtime.bench import (BenchSettings, bench_diffusers, bench_lcmtrt, condition_images, format_report,
                                      speedups)
    from lcmtrt.runtime.bundle import load_bundle

    if args.iterations < 1 or args.warmup < 0:
        raise UserError("--iterations must be at least 1 and --warmup at least 0")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    bundle = load_bundle(args.engines)
    if args.compare and condition_images(bundle):
        raise UserError("--compare diffusers does not cover ControlNet or T2I-Adapter bundles yet; "
                        "bench them without --compare")
    settings = BenchSettings(args.batch or bundle.batch_sizes, args.steps or (bundle.default_steps,),
                             args.iterations, args.warmup)
    log.info("benchmarking %s: batches %s, steps %s, %d iterations", args.engines, list(settings.batches),
             list(settings.steps), settings.iterations)
    report = {"lcmtrt": bench_lcmtrt(str(args.engines), args.device, settings)}
    if args.compare == "diffusers":
        log.info("running the diffusers reference ...")
        report["diffusers"] = bench_diffusers(str(args.engines), settings)
        report["speedup"] = speedups(report["lcmtrt"], report["diffusers"])
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lcmtrt.engines.preset import load_preset, preset_names

    for name in preset_names():
        print(f"{name:24s} {load_preset(name).description}")
    return 0


def _served_models(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`DIR` or `NAME=DIR`; a folder whose own name holds `=` still works when it exists."""
    models = []
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder or Path(spec).exists():
            models.append((Path(spec).resolve().name, Path(spec)))
        elif not name:
            raise UserError(f"--engines {spec!r}: NAME=DIR needs a name before '='")
        else:
            models.append((name, Path(folder)))
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lcmtrt.runtime.serve import ServeConfig
        from lcmtrt.runtime.serve_process import run_server
    except ImportError as e:
        raise UserError(f"serving needs the serve extra: pip install 'lcmtrt[serve]' ({e.name} is missing)") from None
    if args.max_n < 1 or args.max_queue < 1 or args.max_body_mb <= 0 or args.request_timeout_s <= 0 \
            or args.max_batch_wait_ms < 0:
        raise UserError("--max-n and --max-queue must be at least 1; --max-body-mb and --request-timeout-s "
                        "positive; --max-batch-wait-ms at least 0")
    keys = [*args.api_key, *(k for k in os.environ.get("LCMTRT_API_KEY", "").split(",") if k)]
    config = ServeConfig(_served_models(args.engines), args.host, args.port, args.device, args.max_n,
                         args.max_batch_wait_ms, args.max_queue, args.max_body_mb, args.request_timeout_s,
                         tuple(keys))
    return run_server(config)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    try:
        from lcmtrt.runtime.bench_serve import LoadSettings, bench_serve
    except ImportError as e:
        raise UserError(f"bench-serve needs the openai client: pip install 'lcmtrt[serve]' ({e.name} is missing)") \
            from None
    if args.requests < 1 or args.seconds <= 0 or args.n < 1 or min(args.concurrency) < 1:
        raise UserError("--requests, --n and every --concurrency must be at least 1, --seconds positive")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    settings = LoadSettings(args.url, args.model, tuple(args.concurrency), args.requests, args.seconds, args.n,
                            args.api_key)
    return bench_serve(settings, args.engines, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lcmtrt")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    root.propagate = False
    commands = {"build-engines": cmd_build, "infer": cmd_infer, "bench": cmd_bench, "presets": cmd_presets,
                "serve": cmd_serve, "bench-serve": cmd_bench_serve}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"lcmtrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcmtrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

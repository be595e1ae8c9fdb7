"""`lcmtrt infer`: images from a bundle, written as each engine batch finishes."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lcmtrt.cli.args import (add_device_flag, add_sampler_flags, bounded, bounded_floats, pair_arg, probe_writable,
                             seeds_arg)
from lcmtrt.errors import UserError
from lcmtrt.runtime.settings import GenerationSettings

log = logging.getLogger("lcmtrt")
GRID_LIMIT = 64  # a grid is one image held in memory: beyond this, one file per image
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def add_infer_command(commands: argparse._SubParsersAction) -> None:
    infer = commands.add_parser("infer", help="generate images from a bundle")
    infer.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")
    infer.add_argument("prompt", nargs="+", help="one image per prompt (times --num-images)")
    infer.add_argument("--negative-prompt", default="")
    infer.add_argument("--num-images", type=bounded("num_images"), default=1, help="images per prompt")
    infer.add_argument("--seed", type=seeds_arg, help="one seed for the batch, or one per image (comma-separated)")
    infer.add_argument("--steps", type=bounded("steps"))
    infer.add_argument("--guidance-scale", type=bounded("guidance_scale"))
    infer.add_argument("--original-inference-steps", type=bounded("original_inference_steps"))
    add_sampler_flags(infer)
    infer.add_argument("--output", type=Path, default=Path("output.png"),
                       help="image path; several images get -0, -1, ... before the suffix")
    infer.add_argument("--grid", action="store_true",
                       help="save all images as one grid (inputs first; with an input per image, one row per image "
                            "beside its inputs)")
    infer.add_argument("--image", action="append", type=Path,
                       help="image-to-image input: once for all prompts, or once per image")
    infer.add_argument("--mask", action="append", type=Path,
                       help="inpainting (bundles built with --inpaint or a 9-channel model): white repaints, black "
                            "keeps; grey binarised at 50%% and resized to the bundle's size as diffusers does; once "
                            "for all images or once per image, with --image")
    infer.add_argument("--strength", type=bounded("strength"),
                       help="in (0, 1]: image-to-image (default 0.8) or inpainting (default 1.0, diffusers' inpaint "
                            "pipelines; 1 starts from noise, lower keeps more of the image and drops steps)")
    infer.add_argument("--img2img-mode", choices=("classic", "lcm"), default="classic",
                       help="classic: drop the first steps (AutoPipelineForImage2Image); lcm: all steps, shorter "
                            "schedule (LatentConsistencyModelImg2ImgPipeline)")
    infer.add_argument("--fit", choices=("stretch", "crop"), default="stretch",
                       help="how an input image of another size is fitted (stretch: as diffusers)")
    add_device_flag(infer)
    infer.add_argument("--control-image", action="append", type=Path,
                       help="ControlNet bundles: a ready control map (or a photo with --canny), once or once per "
                            "image; a MultiControlNet bundle: once per ControlNet, in build order, for all images")
    infer.add_argument("--canny", nargs="?", const=(100, 200), type=pair_arg, metavar="LOW,HIGH",
                       help="compute the canny map of every --control-image with OpenCV (default thresholds 100,200)")
    # a MultiControlNet takes each of these once for all its ControlNets or once per ControlNet: 0.8,0.5
    infer.add_argument("--control-scale", type=bounded_floats("control_scale"), default=1.0,
                       help="ControlNet conditioning scale (one, or one per ControlNet: 0.8,0.5)")
    infer.add_argument("--control-start", type=bounded_floats("control_start"), default=0.0,
                       help="diffusers' control_guidance_start (one, or one per ControlNet)")
    infer.add_argument("--control-end", type=bounded_floats("control_end"), default=1.0,
                       help="diffusers' control_guidance_end (one, or one per ControlNet)")
    infer.add_argument("--save-control", type=Path, help="write the control map used (first one)")
    infer.add_argument("--adapter-scale", type=bounded("adapter_scale"), default=1.0, help="T2I-Adapter conditioning scale")
    infer.add_argument("--adapter-factor", type=bounded("adapter_factor"), default=1.0,
                       help="fraction of the steps the T2I-Adapter conditions (diffusers' adapter_conditioning_factor)")
    infer.add_argument("--lora", action="append", metavar="ID_OR_FILE[:WEIGHT]",
                       help="use this LoRA set instead of the bundle's (refittable bundles); repeatable; "
                            "--lora none for the base model")
    infer.add_argument("--original-size", type=pair_arg, metavar="H,W", help="SDXL micro-conditioning (default: H,W)")
    infer.add_argument("--crop-top-left", type=pair_arg, metavar="TOP,LEFT", default=(0, 0),
                       help="SDXL micro-conditioning (default: 0,0)")
    infer.add_argument("--target-size", type=pair_arg, metavar="H,W", help="SDXL micro-conditioning (default: H,W)")


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


def grid_image(images, cols: int | None = None):
    """Images side by side in rows of `cols` (default: up to four, like diffusers' make_image_grid)."""
    from PIL import Image

    count, height, width = len(images), images[0].shape[0], images[0].shape[1]
    cols = cols or min(count, 4)
    rows = -(-count // cols)
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % cols) * width, (i // cols) * height))
    return grid


def grid_tiles(results: list, per_result: list[list], shared: list) -> tuple[list, int | None]:
    """The grid's tiles and its column count. `per_result` holds input lists given once or once per result;
    `shared` inputs serve every result. With some input given per result, each result gets its own row beside its
    inputs; otherwise the inputs come first, then the results, in rows of up to four."""
    count = len(results)
    if count == 1 or all(len(tiles) != count for tiles in per_result):
        return [tile for tiles in per_result for tile in tiles] + shared + results, None
    rows = [[tiles[i] if len(tiles) == count else tiles[0] for tiles in per_result if tiles] + shared + [result]
            for i, result in enumerate(results)]
    return [tile for row in rows for tile in row], len(rows[0])


def cmd_infer(args: argparse.Namespace) -> int:
    from PIL import Image

    import numpy as np

    from lcmtrt.runtime.images import canny_map, load_image
    from lcmtrt.runtime.inpaint import fit_mask
    from lcmtrt.runtime.pipeline import Pipeline

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    if args.grid and len(prompts) > GRID_LIMIT:
        raise UserError(f"--grid shows at most {GRID_LIMIT} images ({len(prompts)} asked); drop --grid to write "
                        "each image to its own file")
    paths = _output_paths(args.output, len(prompts), args.grid)
    if args.image and len(args.image) not in (1, len(prompts)):
        raise UserError(f"{len(args.image)} --image inputs for {len(prompts)} images; give one or one per image")
    if args.mask and not args.image:
        raise UserError("--mask needs the image it repaints (--image)")
    if args.mask and len(args.mask) not in (1, len(prompts)):
        raise UserError(f"{len(args.mask)} --mask inputs for {len(prompts)} images; give one or one per image")
    sources = [load_image(path) for path in args.image or []]
    masks = [load_image(path, "mask") for path in args.mask or []]  # unreadable masks refused before the bundle loads
    controls = [load_image(path, "control image") for path in args.control_image or []]
    if args.canny:
        controls = [canny_map(image, *args.canny) for image in controls]
    if args.save_control is not None:
        _output_paths(args.save_control, 1, False)
        if not controls:
            raise UserError("--save-control needs --control-image")
    start = time.perf_counter()
    pipeline = Pipeline.load(args.engines, args.device)
    if pipeline.bundle.precision == "int8":  # int8 bundles are OpenVINO's, built for CPUs only
        from lcmtrt.runtime.backends.cpu import warn_if_int8_slow

        warn_if_int8_slow()
    if args.lora:
        from lcmtrt.export.lora import LoraSpec
        from lcmtrt.export.refit import apply_loras

        apply_loras(pipeline, [LoraSpec.parse(text) for text in args.lora if text != "none"])
    loaded = time.perf_counter()
    inputs, control_maps, adapter_maps, shown = _fitted_inputs(pipeline.bundle, args.fit, sources, controls)
    mask_maps = [fit_mask(mask, pipeline.bundle.width, pipeline.bundle.height, args.fit) for mask in masks]
    settings = _settings(args, pipeline.bundle.family, inputs, control_maps, adapter_maps, mask_maps)
    if args.save_control is not None:
        _save(Image.fromarray(shown[0]), args.save_control)
    # each engine batch's images are written as soon as they exist: memory stays bounded whatever --num-images is
    written, grid, result = 0, [], None
    for result in pipeline.generate_pieces(prompts, seed=args.seed, settings=settings):
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
        masks_shown = [np.repeat(mask[..., None], 3, axis=2) for mask in mask_maps]  # as fitted, before binarising
        # a MultiControlNet's maps are one per ControlNet, shared by every image; other inputs may be per image
        multi = pipeline.bundle.control_nets > 1
        tiles, cols = grid_tiles(grid, [inputs, masks_shown] + ([] if multi else [shown]), shown if multi else [])
        _save(grid_image(tiles, cols), paths(0))
        print(paths(0))
    log.info("%d image(s) %dx%d, seed %s, %s timesteps %s, noise from %s; load %.2f s, generate %.2f s",
             len(prompts), pipeline.bundle.width, pipeline.bundle.height, result.seeds,
             args.scheduler or pipeline.bundle.sampler.scheduler, result.timesteps,
             result.noise, loaded - start, done - loaded)
    return 0


def _fitted_inputs(bundle: Any, fit: str, sources: list, controls: list) -> tuple[list, list, list | None, list]:
    """Input images at the bundle's size, and the control maps as the bundle takes them: (inputs, ControlNet maps,
    T2I-Adapter maps, the maps as shown). Maps are resized as diffusers' control and adapter preprocessing do
    (Lanczos); a T2I-Adapter takes them with its own channel count (1: grayscale)."""
    from lcmtrt.runtime.images import fit_image

    inputs = [fit_image(image, bundle.width, bundle.height, fit) for image in sources]
    size = (bundle.width, bundle.height)
    control_maps = [fit_image(image, *size) for image in controls]
    adapter = bundle.engines.get("adapter")
    if adapter is None or not controls:
        return inputs, control_maps, None, control_maps
    gray = adapter.inputs[0].shape[-1] == 1
    adapter_maps = [fit_image(image.convert("L"), *size)[..., None] if gray else fit_image(image, *size)
                    for image in controls]
    return inputs, [], adapter_maps, [fit_image(image, *size) for image in controls]


def _settings(args: argparse.Namespace, family: str, inputs: list, control_maps: list,
              adapter_maps: list | None, masks: list) -> GenerationSettings:
    """The pipeline's generation settings from the command line."""
    sdxl_flags = [f for f in ("original_size", "target_size") if getattr(args, f)] + (
        ["crop_top_left"] if args.crop_top_left != (0, 0) else [])
    if sdxl_flags and family != "sdxl":
        log.warning("warning: --%s only conditions SDXL-class models; ignored", sdxl_flags[0].replace("_", "-"))
    return GenerationSettings(
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
        masks=masks or None,
        scheduler=args.scheduler,
        eta=args.eta,
        timesteps=args.timesteps,
    )

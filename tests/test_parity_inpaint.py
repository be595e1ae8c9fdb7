"""Inpainting on tiny checkpoints vs diffusers' StableDiffusion(XL)InpaintPipeline with LCMScheduler, run here with
the same seeds: the 9-channel inpainting UNet with LCM-LoRA and classifier-free guidance (the LCM guide's route) and
a 4-channel LCM UNet blending the source outside the mask after each step, for SD1.5 and SDXL, and blending under
classifier-free guidance (a 4-channel base UNet with LCM-LoRA, SD1.5); strength 1 (start
from noise) and below (drop steps, start from the noised image); one mask for all images and one per image; one
generator and one per image; `--num-images N` in pieces of the built batch sizes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_images_match, to_uint8
from lcmtrt.engines.preset import load_preset
from lcmtrt.errors import UserError
from lcmtrt.runtime.pipeline import Pipeline

PROMPTS = ["an astronaut in a garden, watercolor", "a cup of coffee, oil painting"]
NEGATIVE = "blurry, low quality"
# (guidance, negative prompt) per preset: CFG with a negative prompt for the LCM-LoRA routes, 9-channel and blending
# (the guide's guidance 4; SDXL LCM-LoRA's recommended 2), the embedding for the LCM-distilled blend routes
GUIDANCE = {"tiny-sd15-inpaint": (4.0, NEGATIVE), "tiny-sdxl-inpaint": (2.0, NEGATIVE),
            "tiny-sd15-blend": (8.0, None), "tiny-sdxl-blend": (8.0, None), "tiny-sd15-lora-blend": (4.0, NEGATIVE)}


@pytest.fixture(scope="module", params=list(GUIDANCE))
def models(request, build_tiny, backend: str):
    from lcmtrt.export.reference import reference_pipeline

    preset = load_preset(request.param)
    sources = {"model": preset.model, "loras": [spec.to_json() for spec in preset.loras]}
    reference = reference_pipeline(sources, "sdxl" if "sdxl" in preset.model else "sd15", embedding=not preset.cfg,
                                   inpaint=True)
    return request.param, Pipeline.load(build_tiny(request.param, backend)), reference


def photo(name: str, pipeline: Pipeline) -> np.ndarray:
    from skimage import data

    b = pipeline.bundle
    return np.asarray(Image.fromarray(getattr(data, name)()).resize((b.width, b.height), Image.Resampling.LANCZOS))


def grey_mask(pipeline: Pipeline, centre: tuple[float, float]) -> np.ndarray:
    """A radial gradient: grey values on both sides of diffusers' 0.5 threshold, a boundary off the latent grid."""
    h, w = pipeline.bundle.height, pipeline.bundle.width
    y, x = np.mgrid[0:h, 0:w]
    distance = np.hypot((y - centre[0] * h) / h, (x - centre[1] * w) / w)
    return np.clip(255 * (1.4 - 3 * distance), 0, 255).astype(np.uint8)


def reference(pipe, prompts, images, masks, generator, strength, guidance, negative, num_images=1):
    h, w = images[0].shape[:2]
    kwargs = {"negative_prompt": [negative] * len(prompts)} if negative else {}
    with torch.no_grad():
        return to_uint8(pipe(prompts, image=[Image.fromarray(i) for i in images],
                             mask_image=[Image.fromarray(m, mode="L") for m in masks], height=h, width=w,
                             num_inference_steps=4, strength=strength, guidance_scale=guidance, generator=generator,
                             num_images_per_prompt=num_images, output_type="np", **kwargs).images)


def ours(pipeline, prompts, images, masks, seed, strength, guidance, negative):
    return pipeline.generate(prompts, seed=seed, steps=4, images=images, masks=masks, strength=strength,
                             guidance_scale=guidance, negative_prompts=[negative] if negative else None).images


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_matches_diffusers(models, strength: float) -> None:
    name, pipeline, pipe = models
    guidance, negative = GUIDANCE[name]
    image, mask = photo("astronaut", pipeline), grey_mask(pipeline, (0.4, 0.5))
    result = ours(pipeline, PROMPTS[:1], [image], [mask], 0, strength, guidance, negative)
    expected = reference(pipe, PROMPTS[:1], [image], [mask], torch.manual_seed(0), strength, guidance, negative)
    assert_images_match(result, expected)


# (images, masks, seeds): one per row each; one image and mask for both rows, one generator; one image shared by
# rows with their own masks and generators (only the first generator draws the shared image's VAE sample)
BATCHES = {"per-row": (2, 2, [1, 2]), "shared": (1, 1, 3), "shared-image": (1, 2, [4, 5])}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_batch_of_two(models, batch: str) -> None:
    name, pipeline, pipe = models
    guidance, negative = GUIDANCE[name]
    count_images, count_masks, seeds = BATCHES[batch]
    images = [photo("astronaut", pipeline), photo("coffee", pipeline)][:count_images]
    masks = [grey_mask(pipeline, (0.4, 0.5)), grey_mask(pipeline, (0.7, 0.3))][:count_masks]
    for strength in (1.0, 0.8):
        result = ours(pipeline, PROMPTS, images, masks, seeds, strength, guidance, negative)
        if isinstance(seeds, int):
            generator = torch.manual_seed(seeds)
        else:
            generator = [torch.Generator().manual_seed(s) for s in seeds]
        expected = reference(pipe, PROMPTS, images, masks, generator, strength, guidance, negative)
        assert_images_match(result, expected)


# (images, masks, seeds) for three rows cut into pieces: one image and mask, one generator; then per-row generators
# with one image and mask per row, one shared image with a mask per row, and one shared image and mask
PIECE_LAYOUTS = {"shared-seed": (1, 1, 0), "per-row": (3, 3, [1, 2, 3]), "shared-image": (1, 3, [1, 2, 3]),
                 "shared": (1, 1, [1, 2, 3])}


@pytest.mark.parametrize("layout", list(PIECE_LAYOUTS))
@pytest.mark.parametrize("batch_sizes", [(1, 2), (1,)])
def test_num_images_in_pieces(models, batch_sizes: tuple[int, ...], layout: str) -> None:
    """Three images in pieces (a one-row piece among them): the shared VAE samples drawn once and, with a generator
    per row, by the first generator only; every other draw by the row's own generator, as diffusers."""
    name, pipeline, pipe = models
    guidance, negative = GUIDANCE[name]
    count_images, count_masks, seeds = PIECE_LAYOUTS[layout]
    pipeline = Pipeline(replace(pipeline.bundle, batch_sizes=batch_sizes), pipeline.backend)
    images = [photo(source, pipeline) for source in ("astronaut", "coffee", "chelsea")][:count_images]
    masks = [grey_mask(pipeline, centre) for centre in ((0.5, 0.5), (0.7, 0.3), (0.3, 0.6))][:count_masks]
    settings = dict(steps=4, images=images, masks=masks, strength=0.8, guidance_scale=guidance,
                    negative_prompts=[negative] if negative else None)
    pieces = list(pipeline.generate_pieces(PROMPTS[:1] * 3, seed=seeds, **settings))
    assert [len(p.images) for p in pieces] == ([2, 1] if 2 in batch_sizes else [1, 1, 1])
    result = np.concatenate([p.images for p in pieces])
    if isinstance(seeds, int):
        expected = reference(pipe, PROMPTS[:1], images, masks, torch.manual_seed(seeds), 0.8, guidance, negative,
                             num_images=3)
    else:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        expected = reference(pipe, PROMPTS[:1] * 3, images, masks, generators, 0.8, guidance, negative)
    assert_images_match(result, expected)
    np.testing.assert_array_equal(result, pipeline.generate(PROMPTS[:1] * 3, seed=seeds, **settings).images)


def test_masks_refused_in_one_line(models) -> None:
    name, pipeline, _ = models
    image, mask = photo("astronaut", pipeline), grey_mask(pipeline, (0.5, 0.5))
    h, w = mask.shape
    cases = [([np.zeros_like(mask)], "all black"), ([mask[:, : w // 2]], "masks must be grayscale"),
             ([mask.astype(np.float32)], "uint8"), ([mask] * 3, "3 masks for 2 prompts")]
    for masks, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            pipeline.generate(PROMPTS, seed=0, images=[image], masks=masks)

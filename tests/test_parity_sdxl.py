"""SDXL-class end to end on tiny SDXL-like and SSD-1B-like LCMs (non-square 48x64) vs diffusers'
StableDiffusionXLPipeline with LCMScheduler (add_watermarker=False), run here with the same seeds."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import assert_images_match, assert_latents_close, to_uint8
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
LONG = " ".join(["a very detailed photograph of a red fox in a snowy forest at golden hour, bokeh!"] * 6)


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-ssd1b"])
def models(request, build_tiny, backend: str):
    """(our pipeline, the diffusers pipeline) for one tiny SDXL-class checkpoint."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from lcmtrt.export.models import resolve_model

    out = build_tiny(request.param, backend)
    reference = StableDiffusionXLPipeline.from_pretrained(resolve_model(request.param), add_watermarker=False)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return Pipeline.load(out), reference


def run_reference(pipe, prompts, generator, steps, guidance, output_type="np", **kwargs):
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                    height=64, width=48, output_type=output_type, **kwargs).images


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_matches_diffusers(models, steps: int, guidance: float) -> None:
    ours, reference = models
    result = ours.generate([PROMPT], seed=0, steps=steps, guidance_scale=guidance)
    assert_images_match(result.images, to_uint8(run_reference(reference, [PROMPT], torch.manual_seed(0), steps,
                                                              guidance)))
    latents = run_reference(reference, [PROMPT], torch.manual_seed(0), steps, guidance, output_type="latent")
    assert_latents_close(result.latents, latents.numpy())


def test_batch_rows_equal_separate_calls(models) -> None:
    ours, reference = models
    prompts, seeds = ["papercut, a cute fox", "a castle on a hill, watercolor"], [3, 11]
    result = ours.generate(prompts, seed=seeds, steps=4, guidance_scale=8.0)
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        expected = run_reference(reference, [prompt], torch.manual_seed(seed), 4, 8.0)
        assert_images_match(result.images[row:row + 1], to_uint8(expected))


def test_long_prompt_is_truncated_like_diffusers(models) -> None:
    ours, reference = models
    assert len(LONG.split()) > 77  # more words than CLIP keeps tokens
    result = ours.generate([LONG], seed=5, steps=2, guidance_scale=8.0)
    assert_images_match(result.images, to_uint8(run_reference(reference, [LONG], torch.manual_seed(5), 2, 8.0)))


def test_micro_conditioning(models) -> None:
    """original_size / crop / target_size reach the UNet's time ids exactly as diffusers passes them."""
    ours, reference = models
    kwargs = dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 48))
    result = ours.generate([PROMPT], seed=2, steps=2, guidance_scale=8.0, original_size=(128, 96),
                           crop_top_left=(8, 4), target_size=(64, 48))
    expected = run_reference(reference, [PROMPT], torch.manual_seed(2), 2, 8.0, **kwargs)
    assert_images_match(result.images, to_uint8(expected))
    default = ours.generate([PROMPT], seed=2, steps=2, guidance_scale=8.0)
    assert np.abs(default.images.astype(int) - result.images).max() > 1  # the conditioning is live


def test_image_to_image_matches_sdxl_img2img(models) -> None:
    """Classic img2img with SDXL's micro-conditioning: StableDiffusionXLImg2ImgPipeline + LCMScheduler."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image
    from skimage import data

    ours, reference = models
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((48, 64), Image.Resampling.LANCZOS))
    img2img = StableDiffusionXLImg2ImgPipeline(**reference.components, add_watermarker=False)
    img2img.set_progress_bar_config(disable=True)
    result = ours.generate([PROMPT], seed=0, steps=4, guidance_scale=8.0, images=[photo], strength=0.5)
    with torch.no_grad():
        expected = img2img([PROMPT], image=Image.fromarray(photo), strength=0.5, num_inference_steps=4,
                           guidance_scale=8.0, generator=torch.manual_seed(0), output_type="np").images
    assert_images_match(result.images, to_uint8(expected))

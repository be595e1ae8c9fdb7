"""Every sampler on one bundle per family (the sampler is chosen per request) vs diffusers' StableDiffusion(XL)Pipeline
with that scheduler, run here with the same seed: TCDScheduler (the pipeline's eta), EulerDiscreteScheduler and
DDIMScheduler with trailing spacing, LCMScheduler with custom timesteps; 1, 2, 4 and 8 steps, with and without
classifier-free guidance; one image-to-image case per sampler (StableDiffusion(XL)Img2ImgPipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LATENT_RELATIVE_TOLERANCE, assert_images_match, assert_latents_close, to_uint8
from lcmtrt.engines.preset import load_preset
from lcmtrt.errors import UserError
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "a lighthouse on a cliff at dawn"
TRAILING = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249], 8: [999, 874, 749, 624, 499, 374, 249, 124]}
# (sampler, eta): TCD at its usual eta 0.3 (noise each step), DDIM at eta 0 (no noise) and 0.5 (noise every step)
SAMPLERS = [("tcd", 0.3), ("euler-trailing", None), ("ddim-trailing", None), ("ddim-trailing", 0.5), ("lcm", None)]


def diffusers_scheduler(name: str, config):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    if name == "tcd":
        return TCDScheduler.from_config(config)
    if name == "lcm":
        return LCMScheduler.from_config(config)
    cls = EulerDiscreteScheduler if name == "euler-trailing" else DDIMScheduler
    return cls.from_config(config, timestep_spacing="trailing")


@pytest.fixture(scope="module", params=["tiny-sd15-samplers", "tiny-sdxl-samplers"])
def models(request, build_tiny):
    """(family, our pipeline, diffusers' text-to-image and image-to-image pipelines) for one bundle."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from lcmtrt.export.reference import reference_pipeline

    preset = load_preset(request.param)
    family = "sdxl" if "sdxl" in preset.model else "sd15"
    text = reference_pipeline({"model": preset.model}, family, embedding=False)
    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    image = cls.from_pipe(text)
    image.set_progress_bar_config(disable=True)
    return family, Pipeline.load(build_tiny(request.param)), text, image


def reference(pipe, name: str, steps: int, guidance: float, eta: float | None, output_type: str = "np",
              **extra) -> np.ndarray:
    pipe.scheduler = diffusers_scheduler(name, pipe.scheduler.config)
    # LCM runs DMD2's way: custom timesteps; the others their own schedule for num_inference_steps
    schedule = {"timesteps": TRAILING[steps]} if name == "lcm" else {"num_inference_steps": steps}
    with torch.no_grad():
        return pipe([PROMPT], guidance_scale=guidance, generator=torch.manual_seed(0), output_type=output_type,
                    **({"eta": eta} if eta is not None else {}), **schedule, **extra).images


def ours_settings(name: str, steps: int, eta: float | None) -> dict:
    schedule = {"timesteps": tuple(TRAILING[steps])} if name == "lcm" else {"steps": steps}
    return {"scheduler": name, "eta": eta, **schedule}


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("name,eta", SAMPLERS)
def test_text_to_image_matches_diffusers(models, name: str, eta: float | None, steps: int) -> None:
    _, ours, text, _ = models
    size = {"height": ours.bundle.height, "width": ours.bundle.width}
    for guidance in (1.0, 2.0):  # 1: no CFG; 2: classifier-free guidance
        result = ours.generate([PROMPT], seed=0, guidance_scale=guidance, **ours_settings(name, steps, eta))
        assert_images_match(result.images, to_uint8(reference(text, name, steps, guidance, eta, **size)))
        latents = reference(text, name, steps, guidance, eta, output_type="latent", **size)
        assert_latents_close(result.latents, latents.numpy())


@pytest.mark.parametrize("name,eta", SAMPLERS)
def test_image_to_image_matches_diffusers(models, name: str, eta: float | None) -> None:
    from skimage import data

    family, ours, _, image = models
    size = (ours.bundle.width, ours.bundle.height)
    source = np.asarray(Image.fromarray(data.astronaut()).resize(size, Image.Resampling.LANCZOS))
    result = ours.generate([PROMPT], seed=0, guidance_scale=2.0, images=[source], strength=0.6,
                           **ours_settings(name, 4, eta))
    expected = reference(image, name, 4, 2.0, eta, image=[Image.fromarray(source)], strength=0.6)
    assert_images_match(result.images, to_uint8(expected))


def test_samplers_differ_and_the_bar_would_catch_it(models) -> None:
    """Each (sampler, eta) makes another image from the same seed (beyond the parity bar) or other latents (beyond
    the latent bar), so the tests above tell them apart; the preset's default sampler runs when a request names
    none. Euler and DDIM at eta 0 take the same ODE step (DDIM is Euler in x / sqrt(alpha)) and differ only by
    Euler's start scale (init_noise_sigma = sigma_max, not sqrt(sigma_max^2 + 1)): their images may agree."""
    _, ours, _, _ = models
    results = {(name, eta): ours.generate([PROMPT], seed=0, **ours_settings(name, 4, eta)) for name, eta in SAMPLERS}
    cases = list(results)  # keyed by (name, eta): ddim-trailing runs with two etas
    assert len(cases) == len(SAMPLERS)
    for i, first in enumerate(cases):
        for second in cases[i + 1:]:
            a, b = results[first], results[second]
            pixels = np.abs(a.images.astype(np.int16) - b.images.astype(np.int16)).max()
            latents = np.abs(a.latents.astype(np.float64) - b.latents).max()
            assert pixels > 1 or latents > LATENT_RELATIVE_TOLERANCE * np.abs(b.latents).max(), (first, second)
    default = ours.bundle.sampler
    plain = ours.generate([PROMPT], seed=0, steps=4).images.astype(np.int16)
    same = ours.generate([PROMPT], seed=0, steps=4, scheduler=default.scheduler, eta=default.eta).images
    assert np.array_equal(plain, same)


def test_refusals(models) -> None:
    _, ours, _, _ = models
    with pytest.raises(UserError, match="custom timesteps"):
        ours.generate([PROMPT], seed=0, scheduler="ddim-trailing", timesteps=(999, 499))
    with pytest.raises(UserError, match="--eta applies"):
        ours.generate([PROMPT], seed=0, scheduler="euler-trailing", eta=0.3)
    with pytest.raises(UserError, match="choose one of"):
        ours.generate([PROMPT], seed=0, scheduler="dpm")
    with pytest.raises(UserError, match="img2img-mode lcm"):
        blank = np.zeros((ours.bundle.height, ours.bundle.width, 3), np.uint8)
        ours.generate([PROMPT], seed=0, scheduler="tcd", images=[blank], img2img_mode="lcm")

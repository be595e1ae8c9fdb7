"""Image-to-image on the tiny SD1.5-like LCM vs diffusers run here with the same seed, on a real photograph:
classic (StableDiffusionImg2ImgPipeline + LCMScheduler) and lcm (LatentConsistencyModelImg2ImgPipeline), and the
TAESD (AutoencoderTiny) bundle vs the same pipelines with AutoencoderTiny; `--num-images N` from one image, in pieces
of the built batch sizes, vs num_images_per_prompt=N."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_images_match, on_backend, to_uint8
from lcmtrt.errors import UserError
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "an astronaut in a garden, watercolor"


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut photograph at the tiny bundle's 64x64 (diffusers' Lanczos resize)."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize((64, 64), Image.Resampling.LANCZOS))


def _pipelines(folder: Path, vae=None) -> dict:
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LCMScheduler, StableDiffusionImg2ImgPipeline

    extra = {"vae": vae} if vae is not None else {}
    lcm = LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder, safety_checker=None, **extra)
    classic = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False, **extra)
    classic.scheduler = LCMScheduler.from_config(classic.scheduler.config)
    for pipe in (lcm, classic):
        pipe.set_progress_bar_config(disable=True)
    return {"lcm": lcm, "classic": classic}


@pytest.fixture(scope="module")
def reference(tiny_sd15_dir: Path) -> dict:
    return _pipelines(tiny_sd15_dir)


@pytest.fixture(scope="module")
def ours(tiny_sd15_bundle: Path, backend: str) -> Pipeline:
    return Pipeline.load(on_backend(tiny_sd15_bundle, backend))


def run_reference(pipe, prompts, images, generator, steps, strength, guidance=8.0, num_images=1):
    with torch.no_grad():
        return to_uint8(pipe(prompts, image=[Image.fromarray(i) for i in images], num_inference_steps=steps,
                             strength=strength, guidance_scale=guidance, generator=generator,
                             num_images_per_prompt=num_images, output_type="np").images)


def num_images_in_pieces(pipeline: Pipeline, batch_sizes: tuple[int, ...], image: np.ndarray, mode: str,
                         count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`infer PROMPT --image X --num-images count --seed 0` on a bundle built for `batch_sizes`: the images of
    generate_pieces, and those of one generate() call."""
    pipeline = Pipeline(replace(pipeline.bundle, batch_sizes=batch_sizes), pipeline.backend)
    settings = dict(steps=4, images=[image], strength=0.5, img2img_mode=mode)
    pieces = list(pipeline.generate_pieces([PROMPT] * count, seed=0, **settings))
    assert [len(p.images) for p in pieces] == ([2, 1] if 2 in batch_sizes else [1] * count)
    whole = pipeline.generate([PROMPT] * count, seed=0, **settings).images
    return np.concatenate([p.images for p in pieces]), whole


def _runs(mode: str, steps: int, strength: float) -> bool:
    return mode == "lcm" or int(steps * strength) > 0


@pytest.mark.parametrize("mode", ["classic", "lcm"])
@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8, 1.0])
def test_matches_diffusers(ours, reference, astronaut, mode: str, steps: int, strength: float) -> None:
    if not _runs(mode, steps, strength):
        with pytest.raises(UserError, match="leaves no step"):
            ours.generate([PROMPT], seed=0, steps=steps, images=[astronaut], strength=strength, img2img_mode=mode)
        return
    result = ours.generate([PROMPT], seed=0, steps=steps, images=[astronaut], strength=strength, img2img_mode=mode)
    expected = run_reference(reference[mode], [PROMPT], [astronaut], torch.manual_seed(0), steps, strength)
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("mode", ["classic", "lcm"])
def test_timesteps_follow_the_mode(ours, astronaut, mode: str) -> None:
    result = ours.generate([PROMPT], seed=0, steps=4, images=[astronaut], strength=0.5, img2img_mode=mode)
    assert result.timesteps == {"classic": [499, 259], "lcm": [499, 379, 259, 139]}[mode]


@pytest.mark.parametrize("mode", ["classic", "lcm"])
def test_batch_of_two(ours, reference, astronaut, coffee, mode: str) -> None:
    prompts = [PROMPT, "a cup of coffee, oil painting"]
    # one image per row and one generator per row
    result = ours.generate(prompts, seed=[1, 2], steps=4, images=[astronaut, coffee], strength=0.5, img2img_mode=mode)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]  # manual_seed returns one global
    expected = run_reference(reference[mode], prompts, [astronaut, coffee], generators, 4, 0.5)
    assert_images_match(result.images, expected)
    # one image shared by both rows and one generator: diffusers encodes the image once
    result = ours.generate(prompts, seed=3, steps=4, images=[astronaut], strength=0.8, img2img_mode=mode)
    expected = run_reference(reference[mode], prompts, [astronaut], torch.manual_seed(3), 4, 0.8)
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("mode", ["classic", "lcm"])
@pytest.mark.parametrize("batch_sizes", [(1, 2), (1,)])  # tiny-sd15's; lcm-sdxl and lcm-ssd-1b build batch 1 only
def test_num_images_from_one_image(ours, reference, astronaut, mode: str, batch_sizes: tuple[int, ...]) -> None:
    """diffusers encodes the shared image once (one VAE sample draw), then draws add_noise noise for all 3 rows."""
    images, whole = num_images_in_pieces(ours, batch_sizes, astronaut, mode)
    expected = run_reference(reference[mode], [PROMPT], [astronaut], torch.manual_seed(0), 4, 0.5, num_images=3)
    assert_images_match(images, expected)
    np.testing.assert_array_equal(images, whole)


@pytest.fixture(scope="module")
def taesd_bundle(build_tiny, backend: str) -> Path:
    return build_tiny("tiny-sd15-taesd", backend)


@pytest.fixture(scope="module")
def taesd_reference(tiny_sd15_dir: Path, taesd_bundle: Path) -> dict:
    from diffusers import AutoencoderTiny, LatentConsistencyModelPipeline

    from lcmtrt.export.models import resolve_model

    vae = AutoencoderTiny.from_pretrained(resolve_model("tiny-taesd"))
    pipes = _pipelines(tiny_sd15_dir, vae)
    pipes["text"] = LatentConsistencyModelPipeline.from_pretrained(tiny_sd15_dir, vae=vae, safety_checker=None)
    pipes["text"].set_progress_bar_config(disable=True)
    return pipes


def test_taesd_text_to_image(taesd_bundle: Path, taesd_reference: dict) -> None:
    result = Pipeline.load(taesd_bundle).generate([PROMPT], seed=0, steps=4, guidance_scale=8.0)
    with torch.no_grad():
        expected = taesd_reference["text"]([PROMPT], num_inference_steps=4, guidance_scale=8.0,
                                           generator=torch.manual_seed(0), output_type="np").images
    assert_images_match(result.images, to_uint8(expected))


@pytest.mark.parametrize("mode", ["classic", "lcm"])
def test_taesd_image_to_image(taesd_bundle: Path, taesd_reference: dict, astronaut, coffee, mode: str) -> None:
    """AutoencoderTiny encodes deterministically: no VAE sample draw, so the add_noise draw comes first."""
    pipeline = Pipeline.load(taesd_bundle)
    assert pipeline.encode_noises == ["noise"]
    result = pipeline.generate([PROMPT, "coffee"], seed=[4, 5], steps=4, images=[astronaut, coffee], strength=0.5,
                               img2img_mode=mode)
    expected = run_reference(taesd_reference[mode], [PROMPT, "coffee"], [astronaut, coffee],
                             [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)], 4, 0.5)
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("mode", ["classic", "lcm"])
@pytest.mark.parametrize("batch_sizes", [(1, 2), (1,)])
def test_taesd_num_images_from_one_image(taesd_bundle: Path, taesd_reference: dict, astronaut, mode: str,
                                         batch_sizes: tuple[int, ...]) -> None:
    """TAESD's only draw before the steps is add_noise's, one row per image even from one shared image."""
    images, whole = num_images_in_pieces(Pipeline.load(taesd_bundle), batch_sizes, astronaut, mode)
    expected = run_reference(taesd_reference[mode], [PROMPT], [astronaut], torch.manual_seed(0), 4, 0.5,
                             num_images=3)
    assert_images_match(images, expected)
    np.testing.assert_array_equal(images, whole)

"""T2I-Adapter engine + denoise vs diffusers' StableDiffusionXLAdapterPipeline with LCMScheduler on the tiny
SDXL-like LCM (guidance through the embedding; a negative prompt given and ignored, as diffusers ignores it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_images_match, to_uint8
from lcmtrt.cli.main import main
from lcmtrt.runtime.images import canny_map, fit_image
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "Mona Lisa, 4k, high quality, realistic"


@pytest.fixture(scope="module")
def condition() -> np.ndarray:
    """The guide's recipe on a real photo: canny at 384x384, then resized to the bundle's 48x64."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((384, 384))
    return fit_image(canny_map(photo), 48, 64)


@pytest.fixture(scope="module")
def models(build_tiny, backend: str):
    from diffusers import LCMScheduler, StableDiffusionXLAdapterPipeline, T2IAdapter

    from lcmtrt.export.models import resolve_model

    out = build_tiny("tiny-sdxl-t2i", backend)
    adapter = T2IAdapter.from_pretrained(resolve_model("tiny-t2i-adapter-sdxl"))
    reference = StableDiffusionXLAdapterPipeline.from_pretrained(resolve_model("tiny-sdxl"), adapter=adapter,
                                                                 add_watermarker=False)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return out, Pipeline.load(out), reference


def run_reference(pipe, prompts, condition, generator, scale, factor):
    with torch.no_grad():
        return to_uint8(pipe(prompts, image=Image.fromarray(condition), num_inference_steps=4, guidance_scale=5.0,
                             negative_prompt=["extra digit, fewer digits, cropped, worst quality"] * len(prompts),
                             adapter_conditioning_scale=scale, adapter_conditioning_factor=factor, height=64, width=48,
                             generator=generator, output_type="np").images)


@pytest.mark.parametrize("scale", [0.8, 1.0])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_matches_diffusers(models, condition, scale: float, factor: float) -> None:
    _, ours, reference = models
    result = ours.generate([PROMPT], seed=0, steps=4, guidance_scale=5.0, adapter_images=[condition],
                           adapter_scale=scale, adapter_factor=factor,
                           negative_prompts=["extra digit, fewer digits, cropped, worst quality"])
    assert_images_match(result.images, run_reference(reference, [PROMPT], condition, torch.manual_seed(0), scale,
                                                     factor))


def test_adapter_path_is_live(models, condition) -> None:
    _, ours, _ = models
    images = [ours.generate([PROMPT], seed=0, adapter_images=[condition], adapter_scale=s).images for s in (1.0, 0.2)]
    assert np.abs(images[0].astype(int) - images[1]).max() > 1


def test_cli(models, condition, tmp_path: Path, capsys) -> None:
    out, ours, _ = models
    source = tmp_path / "canny.png"
    Image.fromarray(condition).save(source)
    assert main(["-q", "infer", "--engines", str(out), PROMPT, "--control-image", str(source), "--adapter-scale",
                 "0.8", "--seed", "0", "--output", str(tmp_path / "out.png")]) == 0, capsys.readouterr().err
    expected = ours.generate([PROMPT], seed=0, adapter_images=[condition], adapter_scale=0.8).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)

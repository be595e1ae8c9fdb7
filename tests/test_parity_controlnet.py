"""ControlNet fused into the denoise engine vs diffusers' StableDiffusionControlNetPipeline with LCMScheduler on
the tiny LCM UNet (guidance through the embedding, so no CFG and the control image is not doubled), with a canny
map of a real photograph as diffusers' guide computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_images_match, to_uint8
from lcmtrt.cli.main import main
from lcmtrt.errors import UserError
from lcmtrt.runtime.images import canny_map, fit_image
from lcmtrt.runtime.pipeline import Pipeline

PROMPT = "the mona lisa, oil painting"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def control(photo: Path) -> np.ndarray:
    """The guide's canny map (thresholds 100/200) of the photo, resized to 64x64 like diffusers' preprocessing."""
    return fit_image(canny_map(Image.open(photo).convert("RGB")), 64, 64)


@pytest.fixture(scope="module")
def models(build_tiny, backend: str):
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    from lcmtrt.export.models import resolve_model

    out = build_tiny("tiny-sd15-canny", backend)
    controlnet = ControlNetModel.from_pretrained(resolve_model("tiny-controlnet-sd15"))
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        resolve_model("tiny-sd15"), controlnet=controlnet, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return out, Pipeline.load(out), reference


def run_reference(pipe, prompts, control, generator, scale, start, end, negative=None):
    with torch.no_grad():
        return to_uint8(pipe(prompts, image=Image.fromarray(control), num_inference_steps=4, guidance_scale=8.0,
                             controlnet_conditioning_scale=scale, control_guidance_start=start,
                             control_guidance_end=end, generator=generator, negative_prompt=negative,
                             output_type="np").images)


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)])
def test_matches_diffusers(models, control, scale: float, start: float, end: float) -> None:
    _, ours, reference = models
    result = ours.generate([PROMPT], seed=0, steps=4, guidance_scale=8.0, control_images=[control],
                           control_scale=scale, control_start=start, control_end=end,
                           negative_prompts=["blurry"])
    expected = run_reference(reference, [PROMPT], control, torch.manual_seed(0), scale, start, end,
                             negative=["blurry"])
    assert_images_match(result.images, expected)


def test_batch_rows_with_their_own_control(models, control) -> None:
    _, ours, reference = models
    flipped = np.ascontiguousarray(control[:, ::-1])
    result = ours.generate([PROMPT, "a lighthouse"], seed=[1, 2], steps=4, control_images=[control, flipped])
    for row, (prompt, image, seed) in enumerate([(PROMPT, control, 1), ("a lighthouse", flipped, 2)]):
        expected = run_reference(reference, [prompt], image, torch.manual_seed(seed), 1.0, 0.0, 1.0)
        assert_images_match(result.images[row:row + 1], expected)


def test_control_path_is_live(models, control) -> None:
    _, ours, _ = models
    images = [ours.generate([PROMPT], seed=0, steps=4, control_images=[control], control_scale=s).images
              for s in (1.0, 0.5)]
    assert np.abs(images[0].astype(int) - images[1]).max() > 1


def test_control_errors(models, tiny_sd15_bundle: Path, control) -> None:
    _, ours, _ = models
    with pytest.raises(UserError, match="control image"):
        ours.generate([PROMPT], seed=0)
    with pytest.raises(UserError, match="without ControlNet"):
        Pipeline.load(tiny_sd15_bundle).generate([PROMPT], seed=0, control_images=[control])
    with pytest.raises(UserError, match="control-start"):
        ours.generate([PROMPT], seed=0, control_images=[control], control_start=0.6, control_end=0.5)


def test_cli_canny_from_a_photo(models, photo: Path, control, tmp_path: Path, capsys) -> None:
    out, ours, _ = models
    code = main(["-q", "infer", "--engines", str(out), PROMPT, "--control-image", str(photo), "--canny",
                 "--save-control", str(tmp_path / "canny.png"), "--seed", "0", "--grid",
                 "--output", str(tmp_path / "grid.png")])
    assert code == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "canny.png")), control)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (64, 128, 3)  # control map and result side by side
    expected = ours.generate([PROMPT], seed=0, control_images=[control]).images[0]
    np.testing.assert_array_equal(grid[:, 64:], expected)

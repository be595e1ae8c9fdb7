"""A row's result does not depend on the batch it ran in: `infer` at batch 1 and the same request merged by the server
into a batch of 2 give the same bits (latents and pixels), on every CPU backend and for every kind of bundle.

Before export/batch_invariance.py this failed on ONNX Runtime: its Sin/Cos kernels round a SIMD packet's tail
differently, and the tiny time embedding (2 values per row) was all tail at batch 1 and all packets at batch 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from lcmtrt.runtime.pipeline import Pipeline

ALONE = {"prompt": "a painting of a boat, number 2", "seed": 102, "guidance_scale": 8.0}
BESIDE = {"prompt": "a watercolor of a lighthouse at dusk", "seed": 7, "guidance_scale": 3.5}

# preset -> per-row settings of the request that runs alone and of its neighbour in the batch
CASES = {
    "tiny-sd15": ({}, {}),
    "tiny-sdxl": ({}, {}),
    "tiny-lcm-lora-sd15": ({"guidance_scale": 2.0, "negative_prompts": ["blurry"]},  # classifier-free guidance
                           {"guidance_scale": 1.5, "negative_prompts": ["dark"]}),
    "tiny-sd15-canny": ({"control": 1}, {"control": 2}),
    "tiny-sdxl-t2i": ({"adapter": 1}, {"adapter": 2}),
}
IMG2IMG = {"classic": {"strength": 0.5}, "lcm": {"strength": 0.6}}


def _image(pipeline: Pipeline, seed: int, sparse: bool = False) -> np.ndarray:
    shape = (pipeline.bundle.height, pipeline.bundle.width, 3)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return np.where(image > 200, 255, 0).astype(np.uint8) if sparse else image  # sparse: like a canny map


def _settings(pipeline: Pipeline, request: dict, extra: dict) -> dict:
    settings = {k: v for k, v in extra.items() if k not in ("control", "adapter")}
    settings.setdefault("guidance_scale", request["guidance_scale"])
    if "control" in extra:
        settings["control_images"] = [_image(pipeline, extra["control"], sparse=True)]
    if "adapter" in extra:
        settings["adapter_images"] = [_image(pipeline, extra["adapter"], sparse=True)]
    return settings


def _merged(one: dict, two: dict) -> dict:
    """Two requests' per-row settings as one batch's: lists joined, scalars as one per row."""
    merged = {}
    for key in one:
        a, b = one[key], two[key]
        merged[key] = list(a) + list(b) if isinstance(a, list) else [a, b]
    return merged


def _alone_and_merged(pipeline: Pipeline, extra_alone: dict, extra_beside: dict, **shared) -> None:
    alone = _settings(pipeline, ALONE, extra_alone)
    beside = _settings(pipeline, BESIDE, extra_beside)
    solo = pipeline.generate([ALONE["prompt"]], seed=ALONE["seed"], **alone, **shared)
    assert solo.latents.shape[0] == 1
    for order in ((0, 1), (1, 0)):  # first and second row of the engine batch
        requests, settings = [ALONE, BESIDE], [alone, beside]
        first, second = order
        pair = pipeline.generate([requests[first]["prompt"], requests[second]["prompt"]],
                                 seed=[requests[first]["seed"], requests[second]["seed"]],
                                 **_merged(settings[first], settings[second]), **shared)
        row = order.index(0)
        np.testing.assert_array_equal(pair.latents[row], solo.latents[0], err_msg=f"latents, row {row} of 2")
        np.testing.assert_array_equal(pair.images[row], solo.images[0], err_msg=f"pixels, row {row} of 2")


@pytest.mark.parametrize("preset", list(CASES))
def test_row_alone_equals_row_in_a_batch(build_tiny, backend: str, preset: str) -> None:
    pipeline = Pipeline.load(build_tiny(preset, backend))
    assert pipeline.bundle.batch_sizes == (1, 2)
    assert pipeline.bundle.build["batch_invariant"] is True  # recorded at export, kept by `build-engines --from`
    _alone_and_merged(pipeline, *CASES[preset])


@pytest.mark.parametrize("mode", list(IMG2IMG))
def test_img2img_row_alone_equals_row_in_a_batch(build_tiny, backend: str, mode: str) -> None:
    pipeline = Pipeline.load(build_tiny("tiny-sd15", backend))
    image_alone, image_beside = _image(pipeline, 11), _image(pipeline, 12)
    _alone_and_merged(pipeline, {"images": [image_alone]}, {"images": [image_beside]}, img2img_mode=mode,
                      **IMG2IMG[mode])

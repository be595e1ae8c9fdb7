"""A row's result does not depend on the batch it ran in: `infer` at batch 1 and the same request merged by the server
into a batch of 2 give the same bits (latents and pixels), on every CPU backend and for every kind of bundle.

Before export/batch_invariance.py this failed on ONNX Runtime: its Sin/Cos kernels round a SIMD packet's tail
differently, and the tiny time embedding (2 values per row) was all tail at batch 1 and all packets at batch 2.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcmtrt.runtime.backends import batch_invariance
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
    build = pipeline.bundle.build
    assert build["batch_invariant_graphs"] is True  # recorded at export, kept by `build-engines --from`
    assert build["batch_invariance"] == "verified"  # what this test checks, for this backend on the CPU in fp32
    _alone_and_merged(pipeline, *CASES[preset])


@pytest.mark.parametrize("mode", list(IMG2IMG))
def test_img2img_row_alone_equals_row_in_a_batch(build_tiny, backend: str, mode: str) -> None:
    pipeline = Pipeline.load(build_tiny("tiny-sd15", backend))
    image_alone, image_beside = _image(pipeline, 11), _image(pipeline, 12)
    _alone_and_merged(pipeline, {"images": [image_alone]}, {"images": [image_beside]}, img2img_mode=mode,
                      **IMG2IMG[mode])


# ---- what bundle.json records, and what `serve` says ---------------------------------------------------------------

def test_verified_only_where_this_module_checks_it() -> None:
    graphs = {"batch_invariant_graphs": True}
    assert batch_invariance(graphs, "onnxruntime", "cpu", "fp32") == "verified"
    assert batch_invariance(graphs, "openvino", "CPU", "fp32") == "verified"
    for backend, device, precision in [("tensorrt", "cuda", "fp16"), ("onnxruntime", "cuda", "fp32"),
                                       ("onnxruntime", "cpu", "fp16"), ("openvino", "CPU", "bf16"),
                                       ("openvino", "GPU", "fp32")]:
        assert batch_invariance(graphs, backend, device, precision) == "unverified", (backend, device, precision)
    old = {"batch_invariant": True}  # bundles written before: the same rewrite, recorded for every backend
    assert batch_invariance(old, "onnxruntime", "cpu", "fp32") == "verified"
    assert batch_invariance(old, "tensorrt", "cuda", "fp16") == "unverified"
    assert batch_invariance({}, "onnxruntime", "cpu", "fp32") == "absent"


def edited_copy(bundle: Path, dest: Path, drop: tuple[str, ...] = ("batch_invariant_graphs", "batch_invariance"),
                build: dict | None = None, **top) -> Path:
    """A copy of `bundle` whose bundle.json lacks the build keys `drop` and has `build` and `top` set."""
    copy = Path(shutil.copytree(bundle, dest))
    manifest = json.loads((copy / "bundle.json").read_text())
    for key in drop:
        manifest["build"].pop(key, None)
    manifest["build"].update(build or {})
    manifest.update(top)
    (copy / "bundle.json").write_text(json.dumps(manifest))
    return copy


def test_old_bundles_keep_loading_and_their_meaning(build_tiny, tmp_path: Path) -> None:
    from lcmtrt.engines.build import convert_bundle

    old = edited_copy(build_tiny("tiny-sd15"), tmp_path / "old", build={"batch_invariant": True})
    Pipeline.load(old).generate(["a cat"], seed=0, steps=1)
    converted = convert_bundle(old, tmp_path / "converted", backend="onnxruntime", precision="fp32")
    assert converted.build["batch_invariant_graphs"] is True and converted.build["batch_invariance"] == "verified"
    assert "batch_invariant" not in converted.build  # the new bundle says it the new way


def served_warnings(bundle: Path, monkeypatch, caplog, device: str = "auto") -> list[str]:
    app = pytest.importorskip("lcmtrt.serve.app")  # the serve extra
    monkeypatch.setattr(logging.getLogger("lcmtrt"), "propagate", True)  # main() may have turned it off
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcmtrt"):
        app.load_models(app.ServeConfig([("m", bundle)], device=device))
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_serve_warns_where_batch_invariance_is_unverified(build_tiny, tmp_path: Path, monkeypatch, caplog) -> None:
    bundle = build_tiny("tiny-sd15")
    assert served_warnings(bundle, monkeypatch, caplog) == []  # ONNX Runtime, CPU, fp32: verified
    old = edited_copy(bundle, tmp_path / "old", build={"batch_invariant": True})
    assert served_warnings(old, monkeypatch, caplog) == []  # the same, recorded the old way
    for name, build in (("trt", {"batch_invariant_graphs": True}), ("trt-old", {"batch_invariant": True})):
        trt = edited_copy(bundle, tmp_path / name, build=build, backend="tensorrt", precision="fp16")
        (warning,) = served_warnings(trt, monkeypatch, caplog)
        assert "batch invariance is unverified for tensorrt fp16 on cuda" in warning and "--batch 1" in warning
    fp16 = edited_copy(bundle, tmp_path / "fp16", build={"batch_invariant_graphs": True}, precision="fp16")
    (warning,) = served_warnings(fp16, monkeypatch, caplog, device="CPU")
    assert "unverified for onnxruntime fp16 on cpu" in warning
    unpadded = edited_copy(bundle, tmp_path / "unpadded")
    (warning,) = served_warnings(unpadded, monkeypatch, caplog)
    assert "exported before batch-invariant graphs" in warning

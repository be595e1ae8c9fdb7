"""Bundles built before samplers (#24) keep working: schema 1, LCM's 8-column coefficient row in their graphs and
bundle.json, no `coeff_columns` and no sampler defaults. They run LCM bit for bit as today's bundles do and refuse
another sampler in one line. The old bundle is today's tiny bundle rewritten to the old form: its graphs take 8
columns and pad them inside to the general row with the values that make the general step LCM's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lcmtrt.bundle import file_digest
from lcmtrt.cli.main import main
from lcmtrt.runtime.pipeline import Pipeline

LCM_WIDTH = 8  # timestep, c_skip, c_out, sqrt_alpha, sqrt_beta, sqrt_alpha_prev, sqrt_beta_prev, reserved
# input_divisor, denoised_eps, next_eps, next_x, sigma, dt, decode_next: the general step reduced to LCM's
LCM_TAIL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0)


def _take_lcm_columns(graph: Path) -> bool:
    """Rewrites an ONNX graph whose `coeffs` input is the general row to take LCM's 8 columns (False: no coeffs)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph), load_external_data=False)  # the weights' file is left as it is
    coeffs = next((spec for spec in model.graph.input if spec.name == "coeffs"), None)
    if coeffs is None:
        return False
    for node in model.graph.node:
        node.input[:] = ["coeffs_general" if name == "coeffs" else name for name in node.input]
    coeffs.type.tensor_type.shape.dim[0].dim_value = LCM_WIDTH
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(LCM_TAIL, np.float32), "coeffs_lcm_tail"))
    model.graph.node.insert(0, helper.make_node("Concat", ["coeffs", "coeffs_lcm_tail"], ["coeffs_general"], axis=0))
    onnx.save(model, str(graph))
    return True


def _as_built_before_samplers(bundle: Path, old: Path) -> Path:
    """A copy of `bundle` in the form lcmtrt wrote before #24."""
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "bundle.json").read_text())
    rewritten = [rel for rel in manifest["files"] if rel.endswith(".onnx") and _take_lcm_columns(old / rel)]
    assert any(rel.startswith("ort/") for rel in rewritten)  # the graphs ONNX Runtime runs, not only the sources
    for rel in rewritten:
        manifest["files"][rel] = file_digest(old / rel)
    for engine in manifest["engines"].values():
        for spec in engine["inputs"]:
            if spec["name"] == "coeffs":
                spec["shape"] = [LCM_WIDTH]
    manifest["schema_version"] = 1
    del manifest["coeff_columns"]
    manifest["defaults"] = {k: manifest["defaults"][k] for k in ("steps", "guidance_scale")}
    (old / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return old


@pytest.fixture(scope="module")
def bundles(tiny_sd15_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Pipeline]:
    old = _as_built_before_samplers(tiny_sd15_bundle, tmp_path_factory.mktemp("before-samplers") / "tiny-sd15")
    return Pipeline.load(tiny_sd15_bundle), Pipeline.load(old)


def test_old_bundle_runs_lcm_as_today(bundles: tuple[Pipeline, Pipeline]) -> None:
    today, old = bundles
    assert today.bundle.general and not old.bundle.general
    for settings in ({"steps": 4}, {"steps": 1, "guidance_scale": 2.0}, {"timesteps": (999, 499)}):
        expected = today.generate(["a lighthouse", "a red boat"], seed=[3, 4], **settings)
        got = old.generate(["a lighthouse", "a red boat"], seed=[3, 4], **settings)
        np.testing.assert_array_equal(got.images, expected.images)
        np.testing.assert_array_equal(got.latents, expected.latents)
    if "vae_encode" in today.bundle.engines:  # image to image: the encoder takes the coefficient row too
        source = np.random.default_rng(0).integers(0, 256, (today.bundle.height, today.bundle.width, 3), np.uint8)
        for mode in ("classic", "lcm"):
            request = {"seed": 5, "steps": 4, "images": [source], "strength": 0.6, "img2img_mode": mode}
            expected, got = today.generate(["a lighthouse"], **request), old.generate(["a lighthouse"], **request)
            np.testing.assert_array_equal(got.images, expected.images)


def test_old_bundle_refuses_other_samplers(bundles: tuple[Pipeline, Pipeline], tmp_path: Path, capsys) -> None:
    old = bundles[1].bundle.root
    code = main(["infer", "--engines", str(old), "a lighthouse", "--scheduler", "tcd", "--output",
                 str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "runs LCM only" in err[0] and "--scheduler tcd" in err[0], err
    assert not (tmp_path / "out.png").exists()

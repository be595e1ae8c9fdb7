"""Shared fixtures: tiny checkpoints and bundles are built once per session, offline, in a temp folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="session")
def lcmtrt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("lcmtrt-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LCMTRT_CACHE", str(cache))
    mp.delenv("LCMTRT_OPENVINO_CACHE_GB", raising=False)  # the developer's own bound is not the tests'
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def tiny_sd15_dir(lcmtrt_cache: Path) -> Path:
    from lcmtrt.export.models import cache_dir
    from lcmtrt.export.tiny import tiny_checkpoint

    return tiny_checkpoint("tiny-sd15", cache_dir() / "tiny")


@pytest.fixture(scope="session")
def tiny_sd15_bundle(tiny_sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    logging.getLogger("lcmtrt").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("bundles") / "tiny-sd15"
    build_bundle(load_preset("tiny-sd15"), out, backend="onnxruntime", precision="fp32")
    return out


def _openvino_missing() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return True
    return False


# The parity tests run on every CPU backend with the same tolerance; OpenVINO bundles are converted from the ONNX
# Runtime bundle's graphs (build-engines --from), so both run the same export.
BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(_openvino_missing(),
                                                                             reason="openvino is not installed"))]


def on_backend(bundle: Path, backend: str) -> Path:
    """`bundle` (an fp32 ONNX Runtime bundle) for `backend`, converted once per session beside it."""
    if backend == "onnxruntime":
        return bundle
    from lcmtrt.engines.build import convert_bundle

    out = bundle.with_name(f"{bundle.name}-{backend}")
    if not (out / "bundle.json").is_file():
        logging.getLogger("lcmtrt").setLevel(logging.WARNING)
        convert_bundle(bundle, out, backend=backend, precision="fp32")
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrizes a parity module by backend: its tests run once per CPU backend."""
    return request.param


@pytest.fixture(scope="session")
def build_tiny(lcmtrt_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """build_tiny(preset, backend) -> bundle: one fp32 ONNX Runtime build per preset per session, converted for
    other backends."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    built: dict[str, Path] = {}

    def build(preset: str, backend: str = "onnxruntime") -> Path:
        if preset not in built:
            logging.getLogger("lcmtrt").setLevel(logging.WARNING)
            out = tmp_path_factory.mktemp(preset) / preset
            build_bundle(load_preset(preset), out, backend="onnxruntime", precision="fp32")
            built[preset] = out
        return on_backend(built[preset], backend)

    return build


@pytest.fixture(scope="session")
def tiny_sd15_canny_bundle(build_tiny) -> Path:
    return build_tiny("tiny-sd15-canny")


@pytest.fixture(scope="session")
def blend_bundle(build_tiny) -> Path:
    """Inpainting by blending: a 4-channel LCM UNet (ONNX Runtime)."""
    return build_tiny("tiny-sd15-blend")


@pytest.fixture(scope="session")
def unet9_bundle(build_tiny) -> Path:
    """Inpainting with a 9-channel UNet (ONNX Runtime)."""
    return build_tiny("tiny-sd15-inpaint")


def assert_images_match(ours: np.ndarray, reference: np.ndarray) -> None:
    """DESIGN's parity bar: every pixel within 1/255 and at least 99% of them identical."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert (diff == 0).mean() >= 0.99, f"only {(diff == 0).mean():.2%} of pixels identical"


# Convolutions sum thousands of float32 products in a CPU- and library-specific order (MLAS, oneDNN, OpenVINO):
# their results agree to a fraction of the largest magnitude, not to a fixed absolute number.
LATENT_RELATIVE_TOLERANCE = 1e-5  # of max |reference|: ~80 float32 ulp there, far below a 1/255 pixel


def assert_latents_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Final latents within LATENT_RELATIVE_TOLERANCE of the reference's largest magnitude."""
    assert ours.shape == reference.shape
    scale = float(np.abs(reference).max())
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    assert diff <= LATENT_RELATIVE_TOLERANCE * scale, f"latents differ by {diff:.2e} at magnitude {scale:.1f}"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' numpy_to_pil conversion of output_type='np' images."""
    return (images * 255).round().astype("uint8")


def distinct_originals(count: int, config: Any = None, steps: int = 4) -> list[int]:
    """original_inference_steps values whose `steps`-step plans all differ by value (default: LCMScheduler's)."""
    from lcmtrt.bundle import SchedulerConfig
    from lcmtrt.runtime.scheduler import step_plan

    config = config or SchedulerConfig()
    seen, chosen = set(), []
    for original in range(steps, config.num_train_timesteps + 1):
        plan = step_plan(config, steps, original_inference_steps=original)
        if plan not in seen:
            seen.add(plan)
            chosen.append(original)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"fewer than {count} distinct plans")

"""Shared fixtures: tiny checkpoints and bundles are built once per session, offline, in a temp folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def lcmtrt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("lcmtrt-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LCMTRT_CACHE", str(cache))
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


@pytest.fixture(scope="session")
def tiny_sd15_canny_bundle(lcmtrt_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    out = tmp_path_factory.mktemp("canny") / "tiny-sd15-canny"
    build_bundle(load_preset("tiny-sd15-canny"), out, "onnxruntime", "fp32")
    return out


def assert_images_match(ours: np.ndarray, reference: np.ndarray) -> None:
    """DESIGN's parity bar: every pixel within 1/255 and at least 99% of them identical."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert (diff == 0).mean() >= 0.99, f"only {(diff == 0).mean():.2%} of pixels identical"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' numpy_to_pil conversion of output_type='np' images."""
    return (images * 255).round().astype("uint8")

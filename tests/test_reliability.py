"""Builds that must not interleave, and weights from safetensors only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lcmtrt.engines.build import build_bundle
from lcmtrt.engines.staging import build_lock
from lcmtrt.engines.preset import load_preset
from lcmtrt.errors import UserError


def test_second_build_into_the_same_out_is_refused(lcmtrt_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with build_lock(out):  # as if another build were writing there
        with pytest.raises(UserError, match="another build is writing"):
            build_bundle(load_preset("tiny-sd15"), out, "onnxruntime", "fp32")
    assert not out.exists() and not list(tmp_path.glob(".bundle.partial-*"))


def test_checkpoint_with_pickle_weights_only_is_refused(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from lcmtrt.export.models import load_checkpoint

    pickled = Path(shutil.copytree(tiny_sd15_dir, tmp_path / "pickled"))
    for weights in pickled.rglob("*.safetensors"):
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    with pytest.raises(UserError, match="safetensors only"):
        load_checkpoint(str(pickled))

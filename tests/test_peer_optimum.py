"""bench's CPU peer, optimum-intel in its own venv: it loads and times a call on the tiny checkpoint when that venv
exists (scripts/optimum-intel-env.sh), and every way it can be missing ends in one clear UserError."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lcmtrt.errors import UserError
from lcmtrt.bench.peers.optimum_intel import ENV_SCRIPT, OptimumIntelPeer, default_peer_python

PEER_PYTHON = default_peer_python()


@pytest.fixture
def checkpoint_folder(tmp_path: Path) -> Path:
    """Enough of a diffusers folder to pass the peer's own check: the errors come before anything reads it."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "LatentConsistencyModelPipeline"}')
    return folder


@pytest.mark.skipif(not PEER_PYTHON.is_file(), reason=f"no optimum-intel peer venv at {PEER_PYTHON} ({ENV_SCRIPT})")
def test_peer_loads_and_times_a_call(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    with OptimumIntelPeer(tiny_sd15_dir, 64, 64, batch=2, precision="fp32", python=PEER_PYTHON,
                          cache_dir=tmp_path) as peer:
        assert peer.load_s > peer.export_s > 0  # a fresh cache: exported, then loaded and run once
        assert peer.versions["optimum-intel"] and peer.versions["openvino"]
        assert peer.run_once(steps=2, guidance_scale=8.5, seed=1) > 0
    # the export is cached by checkpoint path and mtime: a second peer skips it
    with OptimumIntelPeer(tiny_sd15_dir, 64, 64, batch=1, precision="default", python=PEER_PYTHON,
                          cache_dir=tmp_path, compile_cache=True) as again:
        assert again.export_s == 0.0
        assert any(tmp_path.glob("*/model_cache/*.blob"))  # OpenVINO's compiled-model cache, when asked for
        assert again.run_once(steps=1, guidance_scale=8.5, seed=0) > 0


def test_missing_venv_names_the_script(checkpoint_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="optimum-intel-env.sh"):
        OptimumIntelPeer(checkpoint_folder, 64, 64, 1, "fp32", python=tmp_path / "nowhere" / "bin" / "python")


@pytest.mark.skipif(importlib.util.find_spec("optimum") is not None, reason="this Python has optimum installed")
def test_venv_without_optimum_names_the_script(checkpoint_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot import optimum-intel.*optimum-intel-env.sh"):
        OptimumIntelPeer(checkpoint_folder, 64, 64, 1, "fp32", python=Path(sys.executable), cache_dir=tmp_path)


def test_not_a_checkpoint_or_precision(checkpoint_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a diffusers checkpoint"):
        OptimumIntelPeer(tmp_path / "empty", 64, 64, 1, "fp32", python=Path(sys.executable))
    with pytest.raises(UserError, match="precision 'bf16'"):
        OptimumIntelPeer(checkpoint_folder, 64, 64, 1, "bf16", python=Path(sys.executable))

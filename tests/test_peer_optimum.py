"""bench's CPU peers in their own venv (scripts/optimum-intel-env.sh): optimum-intel's OVLatentConsistencyModelPipeline
and openvino-genai's Text2ImagePipeline on optimum-intel's export. They load, time a call and return images on the
tiny checkpoint when that venv exists (genai's tests also need openvino_genai in it); every way the venv can be
missing ends in one clear UserError; bench reports both peers from one run; and bundles a peer cannot reproduce are
refused in one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcmtrt.bench.offline import compare_images
from lcmtrt.bench.peers.optimum_intel import (ENV_SCRIPT, KINDS, OpenVinoPeer, default_peer_python,
                                              optimum_cache_dir, peer_checkpoint)
from lcmtrt.cli.main import main
from lcmtrt.errors import UserError

PEER_PYTHON = default_peer_python()
PROMPTS = ["a cinematic photo of a lighthouse on a cliff at dusk", "portrait of a cat, oil painting"]


def _peer_venv_has(module: str) -> bool:
    if not PEER_PYTHON.is_file():
        return False
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(PEER_PYTHON), "-c", check], capture_output=True).returncode == 0


needs_venv = pytest.mark.skipif(not PEER_PYTHON.is_file(),
                                reason=f"no optimum-intel peer venv at {PEER_PYTHON} ({ENV_SCRIPT})")
needs_genai = pytest.mark.skipif(not _peer_venv_has("openvino_genai"),
                                 reason=f"no openvino_genai in the peer venv at {PEER_PYTHON} ({ENV_SCRIPT})")


@pytest.fixture
def checkpoint_folder(tmp_path: Path) -> Path:
    """Enough of a diffusers folder to pass the peer's own check: the errors come before anything reads it."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "LatentConsistencyModelPipeline"}')
    return folder


@pytest.fixture(scope="module")
def peer_cache(tiny_sd15_dir: Path) -> Path:
    """The session's $LCMTRT_CACHE/optimum, as bench uses it: the tiny checkpoint is exported once for this module."""
    return optimum_cache_dir()


@needs_venv
def test_peer_loads_and_times_a_call(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=2, precision="fp32", python=PEER_PYTHON,
                      cache_dir=tmp_path) as peer:
        assert peer.load_s > peer.export_s > 0  # a fresh cache: exported, then loaded and run once
        assert peer.versions["optimum-intel"] and peer.versions["openvino"]
        assert peer.run_once(steps=2, guidance_scale=8.5, seed=1) > 0
    # the export is cached by checkpoint path and mtime: a second peer skips it
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=1, precision="default", python=PEER_PYTHON,
                      cache_dir=tmp_path, compile_cache=True) as again:
        assert again.export_s == 0.0
        assert any(tmp_path.glob("*/model_cache/*.blob"))  # OpenVINO's compiled-model cache, when asked for
        assert again.run_once(steps=1, guidance_scale=8.5, seed=0) > 0


@needs_genai
def test_genai_draws_the_noise_optimum_intel_draws(tiny_sd15_dir: Path, peer_cache: Path) -> None:
    """genai's TorchGenerator(seed) draws what torch.manual_seed(seed) gives optimum-intel (and diffusers): on the
    same export, in fp32, the two pipelines' images agree to 1/255 for every prompt; another seed is another image."""
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=1, precision="fp32", cache_dir=peer_cache) as optimum:
        reference = optimum.images(PROMPTS, steps=4, guidance_scale=8.5, seed=5)
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=1, precision="fp32", cache_dir=peer_cache,
                      kind="openvino-genai") as genai:
        assert genai.export_s == 0.0  # optimum-intel's export, reused
        assert genai.load_s > 0 and genai.run_once(steps=2, guidance_scale=8.5, seed=1) > 0
        env = genai.environment()
        assert env["peer"] == KINDS["openvino-genai"] and env["shapes"] == "static" and env["precision"] == "fp32"
        assert env["openvino-genai"].startswith(env["openvino"].split("-")[0])  # one release: genai on its OpenVINO
        images = genai.images(PROMPTS, steps=4, guidance_scale=8.5, seed=5)
        again = genai.images(PROMPTS[:1], steps=4, guidance_scale=8.5, seed=5)
        other_seed = genai.images(PROMPTS[:1], steps=4, guidance_scale=8.5, seed=6)
    assert images.shape == reference.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert compare_images(images, reference)["max_diff"] <= 1
    assert np.array_equal(again, images[:1])  # a copy each time: genai reuses its output tensor's memory
    assert compare_images(other_seed, images[:1])["max_diff"] > 1


@needs_genai
def test_genai_batch_of_two_runs_on_dynamic_shapes(tiny_sd15_dir: Path, peer_cache: Path) -> None:
    """genai 2026.4's static reshape breaks LCM at two images per prompt, so the peer keeps dynamic shapes there;
    its two images per prompt are still optimum-intel's two."""
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=2, precision="fp32", cache_dir=peer_cache,
                      kind="openvino-genai") as genai:
        assert genai.shapes.startswith("dynamic")
        assert genai.run_once(steps=1, guidance_scale=8.5, seed=0) > 0
        images = genai.images(PROMPTS[:1], steps=2, guidance_scale=8.5, seed=3)
    with OpenVinoPeer(tiny_sd15_dir, 64, 64, batch=2, precision="fp32", cache_dir=peer_cache) as optimum:
        reference = optimum.images(PROMPTS[:1], steps=2, guidance_scale=8.5, seed=3)
    assert images.shape == (2, 64, 64, 3)
    assert compare_images(images, reference)["max_diff"] <= 1


@needs_genai
def test_bench_times_both_peers_in_one_run(tiny_sd15_bundle: Path, peer_cache: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "bench.json"
    code = main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--steps", "2", "--iterations", "2",
                 "--warmup", "1", "--compare", "optimum-intel", "--compare", "openvino-genai",
                 "--peer-precision", "default", "--peer-fidelity", "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["speedup"]) == {"optimum-intel", "openvino-genai"}
    for kind in ("optimum-intel", "openvino-genai"):
        peer = report[kind]
        assert peer["environment"]["peer"] == KINDS[kind] and peer["environment"]["precision"] == "default"
        assert peer["results"]["batch1-steps2"]["end_to_end"]["p50_ms"] > 0
        assert report["speedup"][kind]["batch1-steps2"]["end_to_end_p50"] > 0
        fidelity = peer["fidelity"]  # the default precision's images against the same peer's fp32 ones
        assert fidelity["reference"] == f"{kind} fp32" and fidelity["images"] == 1
        assert 0 <= fidelity["within_1_pct"] <= 100 and 0 <= fidelity["max_diff"] <= 255
        assert f"{kind} fidelity vs fp32" in out and f"vs {kind}" in out


def test_compare_images() -> None:
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert compare_images(a, a) == {"psnr_db": float("inf"), "max_diff": 0, "within_1_pct": 100.0}
    b = a.copy()
    b[0, 0, 0, 0], b[1, 0, 0, :] = 255, 1  # one value off by 255, three by 1, of 96
    result = compare_images(a, b)
    assert result["max_diff"] == 255 and result["within_1_pct"] == pytest.approx(100 * 95 / 96)
    assert result["psnr_db"] == pytest.approx(10 * np.log10(255**2 / ((255**2 + 3) / 96)))
    with pytest.raises(ValueError, match="shapes"):
        compare_images(a, a[:1])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_peer_refuses_what_it_cannot_reproduce(kind: str) -> None:
    sdxl = SimpleNamespace(family="sdxl", guidance_mode="embedding", sources={"model": "x"})
    with pytest.raises(UserError, match=f"--compare {kind} covers SD1.5-family"):
        peer_checkpoint(sdxl, kind)
    lora = SimpleNamespace(family="sd15", guidance_mode="embedding", sources={"model": "x", "loras": [{"id": "l"}]})
    with pytest.raises(UserError, match=f"--compare {kind} runs the plain checkpoint; this bundle adds loras"):
        peer_checkpoint(lora, kind)


@pytest.mark.parametrize("bundle, argv, fragment", [
    ("tiny_sd15_canny_bundle", ["--compare", "openvino-genai"], "--compare openvino-genai does not cover ControlNet"),
    ("tiny_sd15_bundle", ["--compare", "openvino-genai", "--peer-fidelity"], "--peer-fidelity compares"),
    ("tiny_sd15_bundle", ["--compare", "diffusers", "--peer-precision", "default", "--peer-fidelity"],
     "--peer-fidelity compares"),
])
def test_bench_refusals_are_one_line(bundle: str, argv: list[str], fragment: str, request: pytest.FixtureRequest,
                                     capsys: pytest.CaptureFixture) -> None:
    """Refused before anything loads: exit code 2 and one line, whether or not the peer venv exists."""
    code = main(["-q", "bench", "--engines", str(request.getfixturevalue(bundle)), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_missing_venv_names_the_script(kind: str, checkpoint_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"the {kind} peer needs its own venv.*optimum-intel-env.sh"):
        OpenVinoPeer(checkpoint_folder, 64, 64, 1, "fp32", python=tmp_path / "nowhere" / "bin" / "python", kind=kind)


@pytest.mark.parametrize("kind, module", [("optimum-intel", "optimum"), ("openvino-genai", "openvino_genai")])
def test_venv_without_the_peer_names_the_script(kind: str, module: str, checkpoint_folder: Path,
                                                tmp_path: Path) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"this Python has {module} installed")
    with pytest.raises(UserError, match=f"cannot import {module}.*optimum-intel-env.sh"):
        OpenVinoPeer(checkpoint_folder, 64, 64, 1, "fp32", python=Path(sys.executable), cache_dir=tmp_path, kind=kind)


def test_not_a_checkpoint_precision_or_kind(checkpoint_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a diffusers checkpoint"):
        OpenVinoPeer(tmp_path / "empty", 64, 64, 1, "fp32", python=Path(sys.executable))
    with pytest.raises(UserError, match="precision 'bf16'"):
        OpenVinoPeer(checkpoint_folder, 64, 64, 1, "bf16", python=Path(sys.executable))
    with pytest.raises(UserError, match="peer 'genai' is not one of optimum-intel, openvino-genai"):
        OpenVinoPeer(checkpoint_folder, 64, 64, 1, "fp32", python=Path(sys.executable), kind="genai")

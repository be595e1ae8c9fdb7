"""A model whose scheduler config changes diffusers' Euler (Karras sigmas, ...): the bundle records those options
and euler-trailing is refused on it in one line, while the other samplers run as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lcmtrt.bundle import MANIFEST, load_bundle
from lcmtrt.cli.main import main
from lcmtrt.engines.checkpoint import euler_options
from lcmtrt.errors import SettingError
from lcmtrt.runtime.scheduler import choose_sampler


def test_only_non_default_euler_options_are_recorded() -> None:
    raw = {"use_karras_sigmas": True, "use_beta_sigmas": None, "use_exponential_sigmas": False, "sigma_min": None,
           "final_sigmas_type": "sigma_min", "interpolation_type": "linear", "timestep_type": "discrete",
           "timestep_spacing": "leading", "beta_start": 0.00085, "original_inference_steps": 50}
    assert euler_options(raw) == {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    assert euler_options({"interpolation_type": "log_linear", "sigma_max": 14.6}) == {
        "interpolation_type": "log_linear", "sigma_max": 14.6}


def test_euler_is_refused_on_a_bundle_recording_them(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = replace(load_bundle(tiny_sd15_bundle), euler_options={"use_karras_sigmas": True})
    with pytest.raises(SettingError, match="use_karras_sigmas=True") as refused:
        choose_sampler(bundle, "euler-trailing", 2, None, None, None, False)
    assert refused.value.api_param == "scheduler" and refused.value.api_message().startswith("scheduler euler")
    assert choose_sampler(bundle, "tcd", 2, None, None, None, False).name == "tcd"

    copy = tmp_path / "karras"
    copy.mkdir()
    for item in tiny_sd15_bundle.iterdir():
        (copy / item.name).symlink_to(item)
    manifest = json.loads((tiny_sd15_bundle / MANIFEST).read_text())
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).write_text(json.dumps({**manifest, "euler_options": {"use_karras_sigmas": True}}))
    capsys.readouterr()
    assert main(["-q", "infer", "--engines", str(copy), "a cat", "--scheduler", "euler-trailing",
                 "--output", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scheduler euler-trailing" in err and "use_karras_sigmas" in err, err
    assert load_bundle(copy).euler_options == {"use_karras_sigmas": True}  # bundle.json keeps them
    assert "euler_options" not in manifest  # a model without them writes nothing new


def test_a_preset_running_euler_is_refused_at_build(tiny_sd15_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A preset whose default sampler is euler-trailing cannot be built from such a model: one line, before export."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset
    from lcmtrt.errors import UserError
    from lcmtrt.export import models

    load = models.load_checkpoint

    def karras(*args, **kwargs):
        checkpoint = load(*args, **kwargs)
        checkpoint.scheduler_config = {**checkpoint.scheduler_config, "use_karras_sigmas": True}
        return checkpoint

    monkeypatch.setattr(models, "load_checkpoint", karras)
    with pytest.raises(UserError, match="runs scheduler euler-trailing, but this model's scheduler config sets "
                                        "use_karras_sigmas=True"):
        build_bundle(replace(load_preset("tiny-sd15"), scheduler="euler-trailing"), tmp_path / "b",
                     backend="onnxruntime", precision="fp32")

"""Preset files: settings of the wrong type are refused in one line before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcmtrt.cli.main import main


@pytest.mark.parametrize("setting", ['inpaint = "yes"', "inpaint = 1", 'img2img = "no"', "cfg = [true]"])
def test_flags_must_be_booleans(setting: str, tmp_path: Path, capsys) -> None:
    config = tmp_path / "flag.toml"
    config.write_text(f'model = "tiny-sd15"\nheight = 64\nwidth = 64\n{setting}\n')
    code = main(["build-engines", "--config", str(config), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip().splitlines()
    name = setting.split()[0]
    assert code == 2 and len(err) == 1 and f"{name} " in err[0] and "must be true or false" in err[0], err
    assert not (tmp_path / "bundle").exists()

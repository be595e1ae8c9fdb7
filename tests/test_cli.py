"""The command line: the demo flow works, and every user mistake is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmtrt.cli.main import main


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """The exit code the `lcmtrt` command gives: main's return value, or argparse's exit for a bad flag."""
    try:
        code = main(["-q", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, *fragments: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcmtrt"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def bundle_copy(tiny_sd15_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_sd15_bundle, tmp_path / "bundle"))


def test_infer_writes_images(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cat.png"
    code, stdout, _ = run(capsys, "infer", "--engines", str(tiny_sd15_bundle), "a cat", "a dog",
                          "--seed", "0", "--steps", "2", "--output", str(out))
    assert code == 0
    paths = [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    assert stdout.split() == [str(p) for p in paths]
    for path in paths:
        image = np.asarray(Image.open(path))
        assert image.shape == (64, 64, 3) and image.std() > 0
    code, stdout, _ = run(capsys, "infer", "--engines", str(tiny_sd15_bundle), "a cat", "--num-images", "3",
                          "--grid", "--output", str(tmp_path / "grid.jpg"))
    assert code == 0 and Image.open(tmp_path / "grid.jpg").size == (3 * 64, 64)


def test_negative_prompt_warns_and_changes_nothing(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--seed", "4"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main([*args, "--negative-prompt", "blurry", "--output", str(tmp_path / "b.png")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "negative" in line]
    assert len(warning) == 1 and "ignored" in warning[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_missing_bundle(tmp_path: Path, capsys) -> None:
    assert_user_error(capsys, ["infer", "--engines", str(tmp_path / "nope"), "x"], "does not exist")
    assert_user_error(capsys, ["infer", "--engines", str(tmp_path), "x"], "not an engine bundle")


def test_corrupt_manifest(bundle_copy: Path, capsys) -> None:
    (bundle_copy / "bundle.json").write_text("{ not json")
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "corrupt", "rebuild")


def test_corrupt_engine_file(bundle_copy: Path, capsys) -> None:
    engine = bundle_copy / "ort" / "denoise.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "ort/denoise.onnx", "rebuild")
    engine.write_bytes(bytes(data[:100]))
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "ort/denoise.onnx", "bytes")
    engine.unlink()
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "missing")


def test_newer_schema(bundle_copy: Path, capsys) -> None:
    manifest = json.loads((bundle_copy / "bundle.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "bundle.json").write_text(json.dumps(manifest))
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "schema 99", "upgrade")


def test_incomplete_manifest(bundle_copy: Path, capsys) -> None:
    manifest = json.loads((bundle_copy / "bundle.json").read_text())
    del manifest["engines"]
    (bundle_copy / "bundle.json").write_text(json.dumps(manifest))
    assert_user_error(capsys, ["infer", "--engines", str(bundle_copy), "x"], "malformed")


@pytest.mark.parametrize("flag", ["--height", "--width"])
def test_size_not_multiple_of_8(flag: str, capsys, tmp_path: Path) -> None:
    assert_user_error(capsys, ["build-engines", "--preset", "tiny-sd15", flag, "60", "--out", str(tmp_path / "b")],
                      "60", "multiple of 8")
    assert not (tmp_path / "b").exists()


def test_steps_above_original_inference_steps(tiny_sd15_bundle: Path, capsys, tmp_path: Path) -> None:
    args = ["infer", "--engines", str(tiny_sd15_bundle), "x", "--output", str(tmp_path / "x.png")]
    assert_user_error(capsys, [*args, "--steps", "60"], "original_inference_steps 50")
    assert_user_error(capsys, [*args, "--steps", "9", "--original-inference-steps", "8"], "original_inference_steps 8")
    assert not (tmp_path / "x.png").exists()


def test_unknown_preset_and_config(capsys, tmp_path: Path) -> None:
    assert_user_error(capsys, ["build-engines", "--preset", "sd-nope"], "unknown preset", "tiny-sd15")
    assert_user_error(capsys, ["build-engines", "--config", str(tmp_path / "none.toml")], "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-sd15"\nheight = 64\nwidth = 64\ncolour = "red"\n')
    assert_user_error(capsys, ["build-engines", "--config", str(bad)], "unknown setting", "colour")


def test_unwritable_output(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["infer", "--engines", str(tiny_sd15_bundle), "x"]
    assert_user_error(capsys, [*args, "--output", str(blocker / "x.png")], "does not exist")
    assert_user_error(capsys, [*args, "--output", str(tmp_path / "missing" / "x.png")], "does not exist")
    assert_user_error(capsys, [*args, "--output", str(tmp_path / "x.gif2")], "unknown image type")


def test_bad_arguments_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", "--engines", "x", "p", "--steps", "four"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_build_engines_reports_stages(tiny_sd15_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "built"
    assert main(["build-engines", "--preset", "tiny-sd15", "--batch", "1", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.strip() == str(out)
    assert "[1] load model tiny-sd15" in stderr and "[10/10] write bundle.json done in" in stderr
    assert "[2/10] export text to ONNX (fp32) done in" in stderr
    assert json.loads((out / "bundle.json").read_text())["batch_sizes"] == [1]


def test_interrupted_build_leaves_nothing(tiny_sd15_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from lcmtrt.export import onnx_export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_graph", interrupted)
    assert main(["build-engines", "--preset", "tiny-sd15", "--out", str(tmp_path / "b")]) == 130
    assert list(tmp_path.iterdir()) == []


def test_img2img_from_the_command_line(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    """Any image Pillow reads: a palette image with transparency, of another size, stretched or cropped."""
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 4), dtype=np.uint8), "RGBA").convert("P").save(source)
    for fit in ("stretch", "crop"):
        out = tmp_path / f"{fit}.png"
        code, _, _ = run(capsys, "infer", "--engines", str(tiny_sd15_bundle), "a cat", "--image", str(source),
                         "--strength", "0.5", "--fit", fit, "--grid", "--output", str(out))
        assert code == 0 and Image.open(out).size == (2 * 64, 64)  # input and output side by side


@pytest.mark.parametrize("strength", ["0", "1.5"])
def test_bad_strength(tiny_sd15_bundle: Path, tmp_path: Path, capsys, strength: str) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(source)
    assert_user_error(capsys, ["infer", "--engines", str(tiny_sd15_bundle), "x", "--image", str(source),
                               "--strength", strength, "--output", str(tmp_path / "o.png")], "--strength")


def test_bad_input_images(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["infer", "--engines", str(tiny_sd15_bundle), "x", "--output", str(tmp_path / "o.png"), "--image"]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_user_error(capsys, [*args, str(empty)], "cannot read input image")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert_user_error(capsys, [*args, str(text)], "cannot read input image")
    assert_user_error(capsys, [*args, str(tmp_path / "missing.png")], "input image", "does not exist")
    assert_user_error(capsys, ["infer", "--engines", str(tiny_sd15_bundle), "x", "--image", str(text), "--image",
                               str(text), "--image", str(text), "--output", str(tmp_path / "o.png")], "one per image")
    good = tmp_path / "good.png"
    Image.new("L", (64, 64)).save(good)
    assert_user_error(capsys, ["infer", "--engines", str(tiny_sd15_bundle), "x", "--image", str(good), "--steps",
                               "2", "--strength", "0.3", "--output", str(tmp_path / "o.png")], "leaves no step")


def test_model_flag_replaces_the_whole_checkpoint(lcmtrt_cache: Path, tmp_path: Path, capsys) -> None:
    """--model takes a full pipeline folder (its own UNet and VAE); the family comes from its configs."""
    from lcmtrt.export.models import resolve_model

    out = tmp_path / "swapped"
    assert main(["-q", "build-engines", "--preset", "tiny-sd15-taesd", "--model", resolve_model("tiny-sdxl"),
                 "--batch", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["family"] == "sdxl" and "vae" not in manifest["sources"]
    assert [t["name"] for t in manifest["engines"]["text"]["inputs"]] == ["input_ids", "input_ids_2"]

"""A generated table of bad (and some good) inputs to infer, build-engines, bench, serve and bench-serve: every run
must end with exit code 0 or 2 and never a traceback; a failing run says why in one line; a successful run wrote a
readable image.

Classes: numbers (0, negative, huge, NaN, inf, not a number) for every numeric flag, and serve's and bench-serve's
flags that contradict each other; paths (missing, a folder instead of a file, unwritable, unicode, very long); image
files (empty, truncated PNG, text, 1x1, huge, 16-bit, CMYK, RGBA, palette, animated GIF); bundle damage (each file
missing, truncated, swapped with another bundle's, bundle.json with each key removed or of the wrong type)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmtrt.cli.main import main

NUMBERS = ["0", "-1", "1e30", "nan", "inf", "-inf", "abc", "0.5", "3"]
# outside every numeric flag's range, or no number at all: refused with exit code 2 whatever the flag
# (lcmtrt/limits.py: every range is finite and starts at 0 or above)
REFUSED = {"-1", "nan", "inf", "-inf", "abc"}
INFER_NUMBERS = ["--guidance-scale", "--steps", "--num-images", "--seed", "--original-inference-steps",
                 "--control-scale", "--control-start", "--control-end", "--adapter-scale", "--adapter-factor"]
IMG2IMG_NUMBERS = ["--strength"]
BUILD_NUMBERS = ["--height", "--width", "--batch", "--workspace-gb"]
BENCH_NUMBERS = ["--iterations", "--warmup", "--batch", "--steps"]
IMAGE_KINDS = ["empty", "truncated", "text", "1x1", "huge", "16bit", "cmyk", "rgba", "palette", "gif"]
PATH_KINDS = ["missing", "folder", "unwritable", "unicode", "long"]
WRONG_TYPES = {"null": None, "string": "x", "list": [1], "number": -3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file of each image kind."""
    folder = tmp_path_factory.mktemp("fuzz-images")
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "good.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:60])
    (folder / "text.png").write_text("this is not an image\n")
    Image.new("RGB", (1, 1)).save(folder / "1x1.png")
    Image.new("1", (30000, 30000)).save(folder / "huge.png")  # a small file that decodes to 900 MP
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(folder / "16bit.png")
    Image.new("CMYK", (40, 40), (0, 100, 200, 10)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (10, 200, 10, 100)).save(folder / "rgba.png")
    Image.new("P", (40, 40), 5).save(folder / "palette.png")
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    frames[0].save(folder / "gif.gif", save_all=True, append_images=frames[1:])
    return folder


def image_path(folder: Path, kind: str) -> Path:
    return next(folder.glob(f"{kind}.*"))


def bad_path(tmp: Path, kind: str, suffix: str) -> Path:
    return {"missing": tmp / "no-such-folder" / f"x{suffix}", "folder": tmp, "unwritable": Path(f"/proc/nope{suffix}"),
            "unicode": tmp / f"Ünïcødé-画像{suffix}", "long": tmp / ("l" * 300 + suffix)}[kind]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(["-q", *argv])
    except SystemExit as e:  # argparse's one-line errors exit 2 themselves
        code = e.code
    _, err = capsys.readouterr()
    return code, err


def assert_clean(code: int, err: str, outputs: list[Path]) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("lcmtrt"), err
    else:
        written = [p for p in outputs if p.exists()]
        assert written, "a successful run wrote no image"
        for path in written:
            with Image.open(path) as image:
                image.load()
    for path in outputs:  # no temporary or half-written file beside the outputs
        if path.parent.is_dir():
            assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name[:64]}.")]


NUMBER_CASES = [(flag, value) for flag in INFER_NUMBERS + IMG2IMG_NUMBERS for value in NUMBERS]


@pytest.mark.parametrize("flag,value", NUMBER_CASES)
def test_infer_numbers(tiny_sd15_bundle: Path, inputs: Path, tmp_path: Path, capsys, flag: str, value: str) -> None:
    out = tmp_path / "o.png"
    argv = ["infer", "--engines", str(tiny_sd15_bundle), "a cat", flag, value, "--output", str(out)]
    if flag in IMG2IMG_NUMBERS:
        argv += ["--image", str(image_path(inputs, "good"))]
    if flag == "--num-images" and value not in ("0", "-1", "0.5", "3"):
        argv += ["--grid"]
    code, err = run(capsys, argv)
    assert_clean(code, err, [out] + sorted(tmp_path.glob("o-*.png")))
    if value in REFUSED:
        assert code == 2, (code, err)


@pytest.mark.parametrize("flag,value", [(f, v) for f in BUILD_NUMBERS for v in NUMBERS])
def test_build_numbers(tmp_path: Path, capsys, lcmtrt_cache: Path, flag: str, value: str) -> None:
    if (flag, value) in (("--workspace-gb", "0.5"), ("--workspace-gb", "3"), ("--batch", "3")):
        pytest.skip("a valid value: this would be a whole build (test_export builds)")
    code, err = run(capsys, ["build-engines", "--preset", "tiny-sd15", flag, value, "--out", str(tmp_path / "b")])
    assert "Traceback" not in err and code == 2, (code, err)  # none of these values builds
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flag,value", [(f, v) for f in BENCH_NUMBERS for v in NUMBERS])
def test_bench_numbers(tiny_sd15_bundle: Path, tmp_path: Path, capsys, flag: str, value: str) -> None:
    argv = ["bench", "--engines", str(tiny_sd15_bundle), flag, value, "--json", str(tmp_path / "b.json")]
    argv += [] if flag == "--iterations" else ["--iterations", "1"]
    argv += [] if flag == "--warmup" else ["--warmup", "0"]
    argv += [] if flag == "--steps" else ["--steps", "1"]
    code, err = run(capsys, argv)
    assert "Traceback" not in err and code in (0, 2), (code, err)
    if value in REFUSED:
        assert code == 2 and not (tmp_path / "b.json").exists(), (code, err)
    assert code == 2 or json.loads((tmp_path / "b.json").read_text())["lcmtrt"]["results"]


SERVE_NUMBERS = ["--port", "--max-n", "--max-batch-wait-ms", "--max-queue", "--max-body-mb", "--request-timeout-s"]
RAY_NUMBERS = ["--replicas", "--gpus-per-replica", "--cpus-per-replica"]
BENCH_SERVE_NUMBERS = ["--requests", "--seconds", "--n"]
OUT_OF_RANGE = ["nan", "inf", "-inf", "-1", "1e30", "abc", ""]  # out of every serve and bench-serve flag's range
NOBODY = "http://127.0.0.1:9"  # bench-serve never gets to connect: its flags are checked first


@pytest.mark.parametrize("flag,value", [(f, v) for f in SERVE_NUMBERS + RAY_NUMBERS for v in OUT_OF_RANGE])
def test_serve_numbers(tmp_path: Path, capsys, flag: str, value: str) -> None:
    """One line naming the flag and its range, before any bundle is read or Ray is started."""
    ray = ["--ray"] if flag in RAY_NUMBERS else []
    code, err = run(capsys, ["serve", "--engines", str(tmp_path / "no-bundle"), f"{flag}={value}", *ray])
    assert_clean(code, err, [])
    assert code == 2 and f"{flag} {value}: must be " in err, err


@pytest.mark.parametrize("flag,value", [(f, v) for f in BENCH_SERVE_NUMBERS for v in [*OUT_OF_RANGE, "0"]])
def test_bench_serve_numbers(capsys, flag: str, value: str) -> None:
    code, err = run(capsys, ["bench-serve", "--url", NOBODY, f"{flag}={value}"])
    assert_clean(code, err, [])
    assert code == 2 and f"{flag} {value}: must be " in err, err


@pytest.mark.parametrize("argv,words", [
    (["serve", "--max-n", "8", "--max-queue", "4"], "--max-n 8 is above --max-queue 4"),
    (["serve", "--api-key", "key "], "--api-key: a key is empty"),
    (["bench-serve", "--url", NOBODY, "--requests", "4", "--concurrency", "1,8"],
     "--requests 4 cannot keep --concurrency 8 busy"),
    (["bench-serve", "--url", NOBODY, "--baseline-url", NOBODY + "/"], "--baseline-url is --url"),
])
def test_serve_contradictions(tmp_path: Path, capsys, argv: list[str], words: str) -> None:
    """Flags that contradict each other are refused at start-up, before any bundle is read or server reached."""
    if argv[0] == "serve":
        argv = [*argv, "--engines", str(tmp_path / "no-bundle")]
    code, err = run(capsys, argv)
    assert_clean(code, err, [])
    assert code == 2 and words in err, err


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@pytest.mark.parametrize("flag", ["--image", "--control-image"])
def test_image_files(tiny_sd15_bundle: Path, inputs: Path, tmp_path: Path, capsys, kind: str, flag: str) -> None:
    out = tmp_path / "o.png"
    code, err = run(capsys, ["infer", "--engines", str(tiny_sd15_bundle), "a cat", flag,
                             str(image_path(inputs, kind)), "--steps", "2", "--output", str(out)])
    assert_clean(code, err, [out])
    if flag == "--control-image":
        assert code == 2  # this bundle has no ControlNet: refused, whatever the file


@pytest.mark.parametrize("kind", PATH_KINDS)
@pytest.mark.parametrize("flag", ["--output", "--image", "--engines", "--json"])
def test_paths(tiny_sd15_bundle: Path, inputs: Path, tmp_path: Path, capsys, kind: str, flag: str) -> None:
    out = tmp_path / "o.png"
    path = bad_path(tmp_path, kind, ".json" if flag == "--json" else "" if flag == "--engines" else ".png")
    if flag == "--json":
        argv = ["bench", "--engines", str(tiny_sd15_bundle), "--iterations", "1", "--warmup", "0", "--steps", "1",
                "--json", str(path)]
    else:
        argv = ["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--steps", "1", "--output", str(out), flag,
                str(path)]
    code, err = run(capsys, argv)
    if flag == "--json":
        assert "Traceback" not in err and code in (0, 2), (code, err)
        assert code == 2 or json.loads(path.read_text())["lcmtrt"]["results"]
    else:
        assert_clean(code, err, [path] if flag == "--output" else [out])


def damaged_copy(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest / "bundle"))


BUNDLE_FILES = ["onnx/denoise.onnx", "onnx/text.onnx", "onnx/vae_decode.onnx", "onnx/vae_encode.onnx",
                "ort/denoise.onnx", "ort/text.onnx", "ort/vae_decode.onnx", "ort/vae_encode.onnx",
                "tokenizer/tokenizer.json", "bundle.json"]
MANIFEST_KEYS = ["schema_version", "family", "precision", "backend", "guidance_mode", "height", "width",
                 "batch_sizes", "latent_channels", "vae_scale_factor", "vae_scaling_factor", "defaults", "scheduler",
                 "text", "engines", "sources", "build", "files"]


@pytest.fixture(scope="module")
def other_bundle(tiny_sd15_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another bundle of the same model (1 step by default, batch 1 only) to swap files with."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    out = tmp_path_factory.mktemp("fuzz-other") / "other"
    build_bundle(load_preset("tiny-sd15").with_overrides(batch_sizes=(1,), height=48), out, "onnxruntime", "fp32")
    return out


@pytest.mark.parametrize("damage", ["missing", "truncated", "swapped"])
@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_bundle_files(tiny_sd15_bundle: Path, other_bundle: Path, tmp_path: Path, capsys, rel: str, damage: str) -> None:
    bundle = damaged_copy(tiny_sd15_bundle, tmp_path)
    target = bundle / rel
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        shutil.copyfile(other_bundle / rel, target)
    out = tmp_path / "o.png"
    code, err = run(capsys, ["infer", "--engines", str(bundle), "a cat", "--steps", "1", "--output", str(out)])
    assert_clean(code, err, [out])
    same = damage == "swapped" and (other_bundle / rel).read_bytes() == (tiny_sd15_bundle / rel).read_bytes()
    assert code == 2 or same  # a file identical in both bundles (the tokenizer, the text encoder) is no damage


@pytest.mark.parametrize("change", ["removed", *WRONG_TYPES])
@pytest.mark.parametrize("key", MANIFEST_KEYS)
def test_manifest_keys(tiny_sd15_bundle: Path, tmp_path: Path, capsys, key: str, change: str) -> None:
    bundle = damaged_copy(tiny_sd15_bundle, tmp_path)
    manifest = json.loads((bundle / "bundle.json").read_text())
    if change == "removed":
        del manifest[key]
    else:
        manifest[key] = WRONG_TYPES[change]
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    out = tmp_path / "o.png"
    code, err = run(capsys, ["infer", "--engines", str(bundle), "a cat", "--steps", "1", "--output", str(out)])
    assert_clean(code, err, [out])

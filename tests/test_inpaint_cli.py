"""`lcmtrt infer --image IMG --mask MASK`: the CLI's image equals the pipeline's for the mask as loaded (resized
like diffusers, whatever its size), --grid shows input, mask and result, and every mask mistake is one line on
stderr with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import assert_user_error, run
from lcmtrt.runtime.images import fit_image, load_image
from lcmtrt.runtime.inpaint import fit_mask
from lcmtrt.runtime.pipeline import Pipeline


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A photo, a mask of another size (80x100, resized like diffusers), an all-black and an all-white mask."""
    rng = np.random.default_rng(0)
    paths = {name: tmp_path / f"{name}.png" for name in ("photo", "mask", "black", "white", "text")}
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(paths["photo"])
    mask = np.zeros((100, 80), np.uint8)
    mask[20:70, 10:60] = 200
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(paths["black"])
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(paths["white"])
    paths["text"].write_text("not an image")
    return paths


@pytest.mark.parametrize("route", ["blend", "unet9"])
def test_infer_inpaints_like_the_pipeline(route, blend_bundle, unet9_bundle, files, tmp_path, capsys) -> None:
    bundle = {"blend": blend_bundle, "unet9": unet9_bundle}[route]
    out = tmp_path / "out.png"
    code, stdout, err = run(capsys, "infer", "--engines", str(bundle), "a cat", "--image", str(files["photo"]),
                            "--mask", str(files["mask"]), "--seed", "0", "--strength", "0.5", "--output", str(out))
    assert code == 0, err
    pipeline = Pipeline.load(bundle)
    mask = fit_mask(load_image(files["mask"]), 64, 64)
    expected = pipeline.generate(["a cat"], seed=0, images=[fit_image(load_image(files["photo"]), 64, 64)],
                                 masks=[mask], strength=0.5).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    grid = tmp_path / "grid.png"
    code, _, err = run(capsys, "infer", "--engines", str(bundle), "a cat", "--num-images", "2", "--image",
                       str(files["photo"]), "--mask", str(files["mask"]), "--grid", "--output", str(grid))
    assert code == 0 and Image.open(grid).size == (4 * 64, 64), err  # input, mask, two results


def test_grid_puts_each_result_beside_its_input_and_mask(blend_bundle, files, tmp_path, capsys) -> None:
    """One image and mask per result: one grid row per result (input, mask, result), never wrapped by fours."""
    flipped, mask2 = tmp_path / "flipped.png", tmp_path / "mask2.png"
    photo = load_image(files["photo"])
    Image.fromarray(np.asarray(photo)[::-1]).save(flipped)
    second = np.zeros((64, 64), np.uint8)
    second[30:60, 5:40] = 255
    Image.fromarray(second).save(mask2)
    grid = tmp_path / "grid.png"
    code, _, err = run(capsys, "infer", "--engines", str(blend_bundle), "a cat", "--num-images", "2", "--image",
                       str(files["photo"]), "--image", str(flipped), "--mask", str(files["mask"]), "--mask",
                       str(mask2), "--seed", "1,2", "--grid", "--output", str(grid))
    assert code == 0, err
    tiles = np.asarray(Image.open(grid))
    assert tiles.shape == (2 * 64, 3 * 64, 3)
    inputs = [fit_image(load_image(path), 64, 64) for path in (files["photo"], flipped)]
    masks = [fit_mask(load_image(path), 64, 64) for path in (files["mask"], mask2)]
    results = Pipeline.load(blend_bundle).generate(["a cat"] * 2, seed=[1, 2], images=inputs, masks=masks).images
    for row in range(2):
        tile = lambda column: tiles[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
        np.testing.assert_array_equal(tile(0), inputs[row])
        np.testing.assert_array_equal(tile(1), np.repeat(masks[row][..., None], 3, axis=2))
        np.testing.assert_array_equal(tile(2), results[row])


def test_all_white_mask_runs_with_a_warning(blend_bundle, files, tmp_path, capsys) -> None:
    code, _, err = run(capsys, "infer", "--engines", str(blend_bundle), "a cat", "--image", str(files["photo"]),
                       "--mask", str(files["white"]), "--output", str(tmp_path / "w.png"))
    assert code == 0 and "all white" in err


def test_mask_mistakes_are_one_line(blend_bundle, unet9_bundle, tiny_sd15_bundle, files, tmp_path, capsys) -> None:
    out = ["--output", str(tmp_path / "x.png")]
    base = ["infer", "--engines", str(blend_bundle), "a cat", "--image", str(files["photo"]), *out]
    assert_user_error(capsys, [*base, "--mask", str(files["black"])], "all black", "nothing to repaint")
    assert_user_error(capsys, [*base, "--mask", str(files["text"])], f"cannot read mask {files['text']}")
    assert_user_error(capsys, [*base, "--mask", str(tmp_path / "missing.png")],
                      f"mask {tmp_path / 'missing.png'} does not exist")  # the mask, never "input image"
    assert_user_error(capsys, [*base, "--num-images", "3", "--mask", str(files["mask"]), "--mask",
                               str(files["mask"])], "2 --mask inputs for 3 images")
    assert_user_error(capsys, ["infer", "--engines", str(blend_bundle), "a cat", "--mask", str(files["mask"]), *out],
                      "--mask needs", "--image")
    assert_user_error(capsys, ["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--image", str(files["photo"]),
                               "--mask", str(files["mask"]), *out], "without inpainting", "--inpaint")
    assert_user_error(capsys, ["infer", "--engines", str(unet9_bundle), "a cat", *out], "9-channel", "--mask")
    assert_user_error(capsys, [*base, "--mask", str(files["mask"]), "--img2img-mode", "lcm"], "lcm does not apply")

"""Runs of any length: noise handed out in pieces equals one draw, infer writes each engine batch's images as soon
as they exist (memory bounded by the largest batch), and an interrupted run keeps what it wrote, with no partial file.
Text-to-image and image-to-image (one shared input image, one per row, and TAESD's single encoder draw)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmtrt.runtime import noise
from lcmtrt.cli.main import main
from lcmtrt.runtime.pipeline import Pipeline

LATENT = (4, 8, 8)
PIECES = [(3, 1, 3), (2, 2, 2, 1), (1,) * 7]  # the built batch sizes cut a run; a one-row piece may follow larger ones


@pytest.mark.parametrize("use_torch", [True, False])
@pytest.mark.parametrize("seeds", [7, [3, 1, 4, 1, 5, 9, 2]])
@pytest.mark.parametrize("names, shared_image", [
    (("latents",), False),  # text-to-image
    (("sample_noise", "noise"), False),  # image-to-image, one input image per row
    (("sample_noise", "noise"), True),  # one input image shared by every row: its VAE sample is drawn once
    (("noise",), True),  # TAESD encodes deterministically: only add_noise's draw, one row per image
])
@pytest.mark.parametrize("pieces", PIECES)
def test_pieces_equal_one_draw(use_torch: bool, seeds, names: tuple[str, ...], shared_image: bool,
                               pieces: tuple[int, ...]) -> None:
    leading = noise.leading_rows(names, 7, shared_image)
    firsts, steps = noise.draw(seeds, 7, LATENT, leading, 4, use_torch)
    stream = noise.NoiseStream(seeds, 7, use_torch, shared_image=shared_image)
    stream.SKIP_BLOCK = 2  # position the phases in several small draws
    taken = [stream.take(count, LATENT, names, 4) for count in pieces]
    for k, first in enumerate(firsts):
        np.testing.assert_array_equal(np.concatenate([p[0][k] for p in taken]), first)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in taken], axis=1), steps)
    with pytest.raises(ValueError, match="rows taken"):
        stream.take(1, LATENT, names, 4)


INPAINT = ("image_sample_noise", "init_noise", "masked_sample_noise")


def per_generator(seeds: list[int], once: frozenset[str], steps: int, use_torch: bool) -> tuple[list, np.ndarray]:
    """diffusers' inpaint draws with one generator per row: each row draws its own (1, ...) tensors in order, except
    a draw made once for a shared image, which only the first generator draws and every row shares."""
    lead = noise._Source(seeds[0], use_torch)
    shared = {name: lead.randn((1, *LATENT))[0] for name in INPAINT}
    firsts, steps_noise = [[] for _ in INPAINT], []
    for row, seed in enumerate(seeds):
        source = noise._Source(seed, use_torch)
        for k, name in enumerate(INPAINT):
            firsts[k].append(shared[name] if name in once and row else source.randn((1, *LATENT))[0])
        steps_noise.append([source.randn((1, *LATENT))[0] for _ in range(steps - 1)] + [np.zeros(LATENT, np.float32)])
    return [np.stack(f) for f in firsts], np.stack(steps_noise).swapaxes(0, 1)


@pytest.mark.parametrize("use_torch", [True, False])
@pytest.mark.parametrize("shared_image, shared_mask", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("pieces", PIECES)
def test_inpaint_pieces_with_per_row_seeds(use_torch: bool, shared_image: bool, shared_mask: bool,
                                           pieces: tuple[int, ...]) -> None:
    """A one-row piece of per-row draws keeps its own generator's draws: sharing is the draw's, not the piece's."""
    seeds = [3, 1, 4, 1, 5, 9, 2]
    once = frozenset(["image_sample_noise"] * shared_image + ["masked_sample_noise"] * shared_mask)
    firsts, steps = per_generator(seeds, once, 4, use_torch)
    stream = noise.NoiseStream(seeds, 7, use_torch, shared_image=shared_image, shared_mask=shared_mask)
    taken = [stream.take(count, LATENT, INPAINT, 4) for count in pieces]
    for k, first in enumerate(firsts):
        np.testing.assert_array_equal(np.concatenate([p[0][k] for p in taken]), first)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in taken], axis=1), steps)


def test_only_the_vae_sample_of_a_shared_image_is_drawn_once() -> None:
    """diffusers encodes one shared image once (one VAE sample row) and draws add_noise noise for every row."""
    assert noise.leading_rows(("sample_noise", "noise"), 3, shared_image=True) == (1, 3)
    assert noise.leading_rows(("noise",), 3, shared_image=True) == (3,)
    assert noise.leading_rows(("sample_noise", "noise"), 3, shared_image=False) == (3, 3)
    assert noise.leading_rows(("latents",), 3, shared_image=True) == (3,)


def test_pieces_equal_one_generate(tiny_sd15_bundle: Path) -> None:
    pipeline = Pipeline.load(tiny_sd15_bundle)
    prompts = ["a red cube", "a blue sphere", "a green cone", "a cat", "a dog"]
    whole = pipeline.generate(prompts, seed=11, steps=2, guidance_scale=[8.0, 7.0, 6.0, 5.0, 4.0])
    pieces = list(pipeline.generate_pieces(prompts, seed=11, steps=2, guidance_scale=[8.0, 7.0, 6.0, 5.0, 4.0]))
    assert [len(p.images) for p in pieces] == [2, 2, 1]  # the largest built batch at a time
    np.testing.assert_array_equal(np.concatenate([p.images for p in pieces]), whole.images)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A smooth colour image at the tiny bundle's 64x64: image-to-image's input."""
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["classic", "lcm"])
@pytest.mark.parametrize("batch_sizes, sizes", [((1, 2), [2, 2, 1]), ((1,), [1] * 5)])
def test_img2img_pieces_equal_one_generate(tiny_sd15_bundle: Path, photo: np.ndarray, mode: str,
                                           batch_sizes: tuple[int, ...], sizes: list[int]) -> None:
    """One shared input image for every row, cut by the built batch sizes: batch 1 only (lcm-sdxl, lcm-ssd-1b) and a
    one-row piece after two-row ones (tiny-sd15)."""
    loaded = Pipeline.load(tiny_sd15_bundle)
    pipeline = Pipeline(replace(loaded.bundle, batch_sizes=batch_sizes), loaded.backend)
    settings = dict(steps=3, images=[photo], strength=0.6, img2img_mode=mode)
    whole = pipeline.generate(["a cat"] * 5, seed=4, **settings)
    pieces = list(pipeline.generate_pieces(["a cat"] * 5, seed=4, **settings))
    assert [len(p.images) for p in pieces] == sizes
    np.testing.assert_array_equal(np.concatenate([p.images for p in pieces]), whole.images)
    np.testing.assert_array_equal(np.concatenate([p.latents for p in pieces]), whole.latents)
    assert len({image.tobytes() for image in whole.images}) == 5  # each row its own add_noise and step noise


def test_img2img_pieces_with_one_image_per_row(tiny_sd15_bundle: Path, photo: np.ndarray) -> None:
    pipeline = Pipeline.load(tiny_sd15_bundle)
    images = [photo, photo[::-1], photo[:, ::-1]]
    settings = dict(steps=2, images=images, strength=0.5, img2img_mode="lcm")
    whole = pipeline.generate(["a", "b", "c"], seed=9, **settings)
    pieces = list(pipeline.generate_pieces(["a", "b", "c"], seed=9, **settings))
    assert [len(p.images) for p in pieces] == [2, 1]
    np.testing.assert_array_equal(np.concatenate([p.images for p in pieces]), whole.images)


def test_infer_image_with_num_images(tiny_sd15_bundle: Path, photo: np.ndarray, tmp_path: Path) -> None:
    """`infer --image X --num-images 3` on tiny-sd15 (batch sizes 1 and 2): a batch of 2, then 1, and no traceback."""
    source = tmp_path / "cat.png"
    Image.fromarray(photo).save(source)
    out = tmp_path / "many.png"
    assert main(["-q", "infer", "--engines", str(tiny_sd15_bundle), "a cat", "--image", str(source),
                 "--num-images", "3", "--seed", "0", "--output", str(out)]) == 0
    expected = Pipeline.load(tiny_sd15_bundle).generate(["a cat"] * 3, seed=0, images=[photo]).images
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"many-{i}.png")), expected[i])


def test_infer_writes_each_batch_and_stays_bounded(tiny_sd15_bundle: Path, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    rows_run, largest_draw = [], []
    original_run, original_randn = Pipeline.run, noise._Source.randn
    monkeypatch.setattr(Pipeline, "run", lambda self, rows: (rows_run.append(len(rows)), original_run(self, rows))[1])
    monkeypatch.setattr(noise._Source, "randn", lambda self, shape: (largest_draw.append(shape[0]),
                                                                     original_randn(self, shape))[1])
    monkeypatch.setattr(noise.NoiseStream, "SKIP_BLOCK", 4)
    out = tmp_path / "many.png"
    assert main(["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--num-images", "40", "--seed", "3",
                 "--steps", "2", "--output", str(out)]) == 0
    assert max(rows_run) == 2 and sum(rows_run) == 40
    assert max(largest_draw) <= 4  # never all 40 images' noise at once
    assert len(list(tmp_path.glob("many-*.png"))) == 40
    monkeypatch.undo()
    expected = Pipeline.load(tiny_sd15_bundle).generate(["a cat"] * 40, seed=3, steps=2).images
    for i in range(40):  # the same images as one generate() of all 40 rows
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"many-{i}.png")), expected[i])
    assert "images written" in capsys.readouterr().err


def test_interrupted_run_keeps_what_it_wrote(tiny_sd15_bundle: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []
    original_run = Pipeline.run

    def interrupted(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_run(self, rows)

    monkeypatch.setattr(Pipeline, "run", interrupted)
    out = tmp_path / "cut.png"
    code = main(["infer", "--engines", str(tiny_sd15_bundle), "a cat", "--num-images", "10", "--seed", "3",
                 "--steps", "1", "--output", str(out)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"cut-{i}.png" for i in range(4)]  # two batches, whole


def test_grid_has_a_limit(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    code = main(["-q", "infer", "--engines", str(tiny_sd15_bundle), "a cat", "--num-images", "65", "--grid",
                 "--output", str(tmp_path / "g.png")])
    assert code == 2 and "--grid shows at most 64" in capsys.readouterr().err

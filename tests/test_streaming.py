"""Runs of any length: noise handed out in pieces equals one draw, infer writes each engine batch's images as soon
as they exist (memory bounded by the largest batch), and an interrupted run keeps what it wrote, with no partial file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmtrt.runtime import noise
from lcmtrt.cli.main import main
from lcmtrt.runtime.pipeline import Pipeline

LATENT = (4, 8, 8)


@pytest.mark.parametrize("use_torch", [True, False])
@pytest.mark.parametrize("seeds", [7, [3, 1, 4, 1, 5, 9, 2]])
@pytest.mark.parametrize("leading", [(7,), (1, 7)])  # text-to-image; image-to-image from one shared image
def test_pieces_equal_one_draw(use_torch: bool, seeds, leading: tuple[int, ...]) -> None:
    firsts, steps = noise.draw(seeds, 7, LATENT, leading, 4, use_torch)
    stream = noise.NoiseStream(seeds, 7, use_torch, shared_first=leading[0] == 1)
    stream.SKIP_BLOCK = 2  # position the phases in several small draws
    pieces = [stream.take(count, LATENT, leading, 4) for count in (3, 1, 3)]
    for k, first in enumerate(firsts):
        np.testing.assert_array_equal(np.concatenate([p[0][k] for p in pieces]), first)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces], axis=1), steps)
    with pytest.raises(ValueError, match="rows taken"):
        stream.take(1, LATENT, leading, 4)


def test_pieces_equal_one_generate(tiny_sd15_bundle: Path) -> None:
    pipeline = Pipeline.load(tiny_sd15_bundle)
    prompts = ["a red cube", "a blue sphere", "a green cone", "a cat", "a dog"]
    whole = pipeline.generate(prompts, seed=11, steps=2, guidance_scale=[8.0, 7.0, 6.0, 5.0, 4.0])
    pieces = list(pipeline.generate_pieces(prompts, seed=11, steps=2, guidance_scale=[8.0, 7.0, 6.0, 5.0, 4.0]))
    assert [len(p.images) for p in pieces] == [2, 2, 1]  # the largest built batch at a time
    np.testing.assert_array_equal(np.concatenate([p.images for p in pieces]), whole.images)


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

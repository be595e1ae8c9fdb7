"""`bench --plot` and `bench-serve --plot`: PNGs of the expected size from synthetic reports (real runs: test_bench.py
and test_serve.py), and a missing matplotlib or a bad name is one line with exit code 2 before anything is measured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from lcmtrt.cli.main import main

pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")

from lcmtrt.bench.plots import SERVE_SIZE, bench_size, plot_bench, plot_serve  # noqa: E402


def result(p50: float, stages: bool = True) -> dict:
    r = {"end_to_end": {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2}, "images_per_s": 1000 / p50}
    if stages:
        r["stages"] = {"text": {"median_ms": 2.0, "p90_ms": 2.5}, "denoise_step": {"median_ms": 7.0, "p90_ms": 8.0},
                       "denoise_total": {"median_ms": 28.0, "p90_ms": 30.0},
                       "vae_decode": {"median_ms": 5.0, "p90_ms": 6.0}}
    return r


def bench_report(settings: list[str]) -> dict:
    env = {"model": "tiny-sd15", "size": "64x64", "backend": "onnxruntime", "precision": "fp32", "device": "cpu",
           "cpu": "AMD EPYC (2 cores; avx2)"}
    return {"lcmtrt": {"environment": env, "results": {s: result(40.0) for s in settings}},
            "diffusers": {"results": {s: result(70.0) for s in settings}},
            "optimum-intel": {"results": {s: result(50.0, stages=False) for s in settings}},  # timed whole
            "speedup": {}}


def assert_png(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size and image.getextrema() != ((255, 255),) * len(image.getbands())


@pytest.mark.parametrize("settings", [["batch1-steps4"], ["batch1-steps1", "batch1-steps2", "batch2-steps1",
                                                           "batch2-steps2"]])
def test_bench_plot_from_a_synthetic_report(tmp_path: Path, settings: list[str]) -> None:
    report = bench_report(settings)
    path = plot_bench(report, tmp_path / "bench.png")
    # a panel per setting and one for images/s, three to a row
    assert bench_size(report) == ((920, 390) if len(settings) == 1 else (1380, 730))
    assert_png(path, bench_size(report))
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary file left


def test_serve_plot_from_a_synthetic_report(tmp_path: Path) -> None:
    levels = [{"concurrency": c, "ok": 32, "refused_503": 3 if c == 16 else 0, "lost": 0, "requests_per_s": 3.0,
               "images_per_s": min(4.0, 2.0 * c ** 0.5), "p50_ms": 300.0 * c, "p90_ms": 350.0 * c,
               "p99_ms": 400.0 * c, "mean_batch": 1.5} for c in (1, 2, 4, 8, 16)]
    report = {"settings": {"n": 1}, "model": {"id": "tiny", "size": "64x64", "backend": "onnxruntime",
                                              "precision": "fp32"},
              "offline": {"by_batch": {"1": {"images_per_s": 4.1, "p50_ms": 245.0},
                                       "2": {"images_per_s": 4.8, "p50_ms": 416.0}}}, "levels": levels}
    assert_png(plot_serve(report, tmp_path / "serve.png"), SERVE_SIZE)
    del report["offline"]
    assert_png(plot_serve(report, tmp_path / "serve.png"), SERVE_SIZE)


def test_plot_needs_matplotlib_and_a_png_name(tiny_sd15_bundle: Path, tmp_path: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["-q", "bench", "--engines", str(tiny_sd15_bundle), "--iterations", "1", "--warmup", "0"]
    assert main([*argv, "--plot", str(tmp_path / "bench.svg")]) == 2
    assert "name it FILE.png" in capsys.readouterr().err
    assert main([*argv, "--plot", str(tmp_path / "missing" / "bench.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for command in (argv, ["-q", "bench-serve", "--url", "http://127.0.0.1:9"]):
        assert main([*command, "--plot", str(tmp_path / "plot.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'lcmtrt[bench]'" in err[0], err
    assert not (tmp_path / "plot.png").exists()

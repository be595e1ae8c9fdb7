"""Benchmark command and the hot-path guarantees it measures: after the first request, a request allocates and
binds nothing, writes its inputs before the first launch and reads only after the last."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from lcmtrt.runtime.backends import onnxruntime as backend_ort
from lcmtrt.cli.main import main
from lcmtrt.runtime.pipeline import Pipeline


def test_requests_do_no_per_step_work(tiny_sd15_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pipeline.load(tiny_sd15_bundle)
    pipeline.generate(["warm up"], seed=0, steps=4)
    events: list[str] = []
    for name in ("alloc", "bind"):
        original = getattr(pipeline.backend, name)
        monkeypatch.setattr(pipeline.backend, name, lambda *a, _o=original, _n=name, **k: (events.append(_n), _o(*a, **k))[1])
    for cls, method in ((backend_ort.OrtBinding, "run"), (backend_ort.OrtBuffer, "write"), (backend_ort.OrtBuffer, "read")):
        original = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *a, _o=original, _m=method: (events.append(_m), _o(self, *a))[1])
    pipeline.generate(["a second request"], seed=1, steps=4)
    assert "alloc" not in events and "bind" not in events
    runs = [i for i, e in enumerate(events) if e == "run"]
    assert len(runs) == 1 + 4 + 1  # text, four denoise steps, decode: one launch each
    assert events[runs[0]:runs[-1] + 1] == ["run"] * len(runs)  # nothing on the host between launches
    assert events.count("write") == 3 + 4  # token ids, guidance, latents, one noise per step
    assert events[runs[-1] + 1:] == ["read", "read"]  # images and final latents
    events.clear()  # the same plan asked for another way (the default original_inference_steps given) is the same
    default = pipeline.bundle.scheduler.original_inference_steps
    pipeline.generate(["a third request"], seed=2, steps=4, original_inference_steps=default)
    assert "alloc" not in events and "bind" not in events and events.count("run") == len(runs)


def test_bench_cli_reports_and_compares(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    plot = ["--plot", str(plot_path)] if importlib.util.find_spec("matplotlib") else []  # the bench extra
    code = main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--batch", "1", "--steps", "1,2",
                 "--iterations", "2", "--warmup", "0", "--compare", "diffusers", "--json", str(report_path), *plot])
    out = capsys.readouterr().out
    assert code == 0
    assert "vs diffusers" in out and "batch1-steps2" in out
    report = json.loads(report_path.read_text())
    assert set(report) == {"lcmtrt", "diffusers", "speedup"}
    ours = report["lcmtrt"]["results"]["batch1-steps2"]
    assert ours["images_per_s"] > 0 and ours["end_to_end"]["p50_ms"] <= ours["end_to_end"]["p99_ms"]
    assert set(ours["stages"]) == {"text", "denoise_step", "denoise_total", "vae_decode"}
    assert report["lcmtrt"]["environment"]["backend"] == "onnxruntime"
    assert report["lcmtrt"]["environment"]["workload"] == "text-to-image"
    if plot:  # the stages of both systems and images/s, drawn from the same report
        from lcmtrt.bench.plots import bench_size

        with Image.open(plot_path) as image:
            assert image.format == "PNG" and image.size == bench_size(report) == (3 * 460, 390)
    assert report["lcmtrt"]["cold_start"]["first_image_s"] >= report["lcmtrt"]["cold_start"]["load_s"]
    assert set(report["speedup"]["diffusers"]["batch1-steps1"]) == {"end_to_end_p50", "images_per_s", "text",
                                                                   "denoise_step", "vae_decode"}
    gap = ours["stage_gap"]  # end to end beside its stages run one at a time
    assert gap["sum_of_stages_ms"] > 0 and gap["gap_ms"] == pytest.approx(ours["end_to_end"]["p50_ms"]
                                                                           - gap["sum_of_stages_ms"])


def test_bench_fidelity_against_a_reference(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    """A non-fp32 bundle (here ONNX Runtime fp16 from the same graphs' checkpoint) is compared with an fp32 one."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    fp16 = tmp_path / "fp16"
    build_bundle(load_preset("tiny-sd15").with_overrides(batch_sizes=(1,), img2img=False), fp16, "onnxruntime", "fp16")
    report_path = tmp_path / "bench.json"
    assert main(["-q", "bench", "--engines", str(fp16), "--iterations", "1", "--warmup", "0", "--reference",
                 str(tiny_sd15_bundle), "--json", str(report_path)]) == 0
    fidelity = json.loads(report_path.read_text())["lcmtrt"]["fidelity"]
    assert fidelity["reference_precision"] == "fp32" and 0 < fidelity["max_diff"] <= 3
    assert 30 < fidelity["psnr_db"] < 100 and 90 < fidelity["within_1_pct"] <= 100
    assert "within 1/255" in capsys.readouterr().out


def test_bench_refuses_unbuilt_batch(tiny_sd15_bundle: Path, capsys) -> None:
    assert main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--batch", "3", "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not built" in err[0]


@pytest.mark.parametrize("spelling", ["same", "dot-slash"])
def test_bench_refuses_a_bundle_given_twice(tiny_sd15_bundle: Path, tmp_path: Path, capsys, spelling: str) -> None:
    """Rows are keyed by name, so one bundle twice (--engines and --also, or --also twice) would merge into one row."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_sd15_bundle, other)
    again = str(other) if spelling == "same" else f"{tmp_path}/./other/"
    for flags in (["--also", str(tiny_sd15_bundle)], ["--also", str(other), "--also", again]):
        assert main(["-q", "bench", "--engines", str(tiny_sd15_bundle), *flags, "--iterations", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already being benchmarked" in err[0], err


def test_bench_times_the_chosen_sampler(tiny_sd15_bundle: Path, tmp_path: Path, capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--scheduler, --eta and --timesteps: every timed request and every stage timing runs that sampler's plan, and
    the report and its first line name it."""
    from lcmtrt.runtime import pipeline as pipeline_module

    chosen = []
    choose = pipeline_module.choose_sampler
    monkeypatch.setattr(pipeline_module, "choose_sampler",
                        lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])
    report_path = tmp_path / "bench.json"
    sampler = ["--scheduler", "tcd", "--eta", "0.3", "--timesteps", "999,499"]
    assert main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--batch", "1", *sampler, "--iterations", "2",
                 "--warmup", "0", "--json", str(report_path)]) == 0
    assert "| tcd eta 0.3, timesteps 999,499 |" in capsys.readouterr().out.splitlines()[0]
    report = json.loads(report_path.read_text())
    environment = report["lcmtrt"]["environment"]
    assert (environment["sampler"], environment["eta"], environment["timesteps"]) == ("tcd", 0.3, [999, 499])
    assert set(report["lcmtrt"]["results"]) == {"batch1-steps2"}  # the step count is the timesteps'
    assert len(chosen) >= 1 + 2 + 2  # the first image, the timed requests, the stage timings
    assert {(c.name, c.steps, c.eta, c.timesteps) for c in chosen} == {("tcd", 2, 0.3, (999, 499))}


@pytest.mark.parametrize("flags,message", [
    (["--scheduler", "tcd", "--compare", "diffusers"], "--compare diffusers runs LCMScheduler only"),
    (["--scheduler", "euler-trailing", "--eta", "0.3"], "--eta applies to"),
    (["--steps", "1,2", "--timesteps", "999,499"], "disagree"),
    (["--scheduler", "ddim-trailing", "--timesteps", "999,499"], "takes no custom timesteps"),
    (["--timesteps", "999,499", "--compare", "optimum-intel"], "takes no custom timesteps"),
])
def test_bench_refuses_samplers_as_infer_does(tiny_sd15_bundle: Path, capsys, flags: list[str],
                                              message: str) -> None:
    assert main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--iterations", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_bench_controlnet_bundle(lcmtrt_cache: Path, tmp_path: Path, capsys) -> None:
    """A ControlNet bundle is timed with a synthetic condition map; the diffusers comparison says it cannot."""
    from lcmtrt.engines.build import build_bundle
    from lcmtrt.engines.preset import load_preset

    out = tmp_path / "canny"
    build_bundle(load_preset("tiny-sd15-canny").with_overrides(batch_sizes=(1,), img2img=False), out, "onnxruntime",
                 "fp32")
    assert main(["-q", "bench", "--engines", str(out), "--iterations", "1", "--warmup", "0"]) == 0
    assert "batch1-steps4" in capsys.readouterr().out
    assert main(["-q", "bench", "--engines", str(out), "--iterations", "1", "--compare", "diffusers"]) == 2
    assert "does not cover ControlNet" in capsys.readouterr().err


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo-{len(flags)}"
    path.write_text(f"processor\t: 0\nmodel name\t: Fake CPU 9000\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return path


def test_cpu_model_names_the_int8_and_bf16_extensions(tmp_path: Path) -> None:
    from lcmtrt.bench.offline import cpu_model, default_openvino_precision
    from lcmtrt.runtime.backends.cpu import int8_warning, cpu_info

    zen3 = _cpuinfo(tmp_path, "avx2 fma")
    xeon = _cpuinfo(tmp_path, "avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_int8 amx_tile")
    client = _cpuinfo(tmp_path, "avx2 avx_vnni")
    assert cpu_model(zen3).startswith("Fake CPU 9000 (") and cpu_model(zen3).endswith(
        "; avx2, no avx512_bf16/amx, no vnni/amx_int8)")
    assert "avx512_vnni, avx_vnni, avx512_bf16, amx_bf16, amx_int8)" in cpu_model(xeon)
    assert cpu_model(client).endswith("; avx2, avx_vnni, no avx512_bf16/amx)")
    assert "VNNI" in int8_warning(cpu_info(zen3)[1])
    assert int8_warning(cpu_info(xeon)[1]) is None and int8_warning(cpu_info(client)[1]) is None
    assert int8_warning(cpu_info(tmp_path / "absent")[1]) is None  # flags unknown: nothing claimed
    assert default_openvino_precision(zen3) == "fp32" and default_openvino_precision(xeon) == "bf16"


class _FakePeer:
    def __init__(self, batch: int, shapes: str):
        self.batch, self.shapes, self.load_s, self.export_s, self.import_s = batch, shapes, 1.0, 0.0, 0.5

    def environment(self) -> dict:
        return {"peer": "openvino-genai Text2ImagePipeline", "precision": "default", "batch": self.batch,
                "threads": 2, "shapes": self.shapes, "openvino": "2026.4"}


def test_peer_environment_per_batch_size_and_ratio_names_its_precision(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker per batch size: genai's batch-2 worker runs dynamic shapes, and the report says so for that batch
    only; the ratio line names the precision the peer ran at."""
    from lcmtrt.bench import offline
    from lcmtrt.runtime.backends import cpu

    monkeypatch.setattr(cpu, "CPUINFO", _cpuinfo(tmp_path, "avx2 avx512_bf16 amx_bf16 amx_int8"))
    peer = offline.OpenVinoPeerContender.__new__(offline.OpenVinoPeerContender)
    peer.name, peer.peers = "openvino-genai", {1: _FakePeer(1, "static"), 2: _FakePeer(2, "dynamic (genai)")}
    timing = {"end_to_end": {"p50_ms": 100.0, "p90_ms": 110.0, "p99_ms": 120.0}, "images_per_s": 10.0}
    results = {"batch1-steps4": timing, "batch2-steps4": {**timing, "images_per_s": 20.0}}
    summary = json.loads(json.dumps(peer.summary(results)))
    environment = summary["environment"]
    assert environment["per_batch"] == {"1": {"batch": 1, "threads": 2, "shapes": "static"},
                                        "2": {"batch": 2, "threads": 2, "shapes": "dynamic (genai)"}}
    assert "shapes" not in environment and environment["default_precision"] == "bf16"
    ours = {"environment": {"model": "m", "size": "64x64", "backend": "openvino", "precision": "bf16",
                            "device": "CPU", "cpu": "Fake"},
            "cold_start": {"load_s": 1.0, "first_image_s": 2.0, "ratio_to_load_plus_warm": 1.5},
            "peak_host_memory_mb": 1.0, "device_memory_in_use_mb": None, "results": results}
    report = {"lcmtrt": ours, "openvino-genai": summary}
    report["speedup"] = {"openvino-genai": offline.speedups(ours, summary)}
    ratio_lines = [line for line in offline.format_report(report).splitlines() if " vs " in line]
    assert len(ratio_lines) == 2 and all("vs openvino-genai (bf16 default)" in line for line in ratio_lines)


def test_bench_inpainting_bundle(build_tiny, tmp_path: Path, capsys) -> None:
    """A 9-channel inpainting bundle only inpaints: it is timed inpainting a synthetic image under a full mask, and
    the report says so."""
    report_path = tmp_path / "bench.json"
    assert main(["-q", "bench", "--engines", str(build_tiny("tiny-sd15-inpaint")), "--batch", "1", "--iterations",
                 "1", "--warmup", "0", "--json", str(report_path)]) == 0
    assert "inpainting" in capsys.readouterr().out
    report = json.loads(report_path.read_text())["lcmtrt"]
    assert report["environment"]["workload"].startswith("inpainting")
    assert set(report["results"]["batch1-steps4"]["stages"]) == {"text", "denoise_step", "denoise_total", "vae_decode"}
    assert main(["-q", "bench", "--engines", str(build_tiny("tiny-sd15-inpaint")), "--iterations", "1",
                 "--compare", "diffusers"]) == 2
    assert "does not cover inpainting" in capsys.readouterr().err

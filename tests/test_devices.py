"""`--device` has one meaning (lcmtrt/runtime/backends/devices.py): one case-insensitive vocabulary for infer, bench and
serve, mapped by each backend to its own device names; a device the bundle's backend cannot use is refused in one
line that names the ones it can (exit code 2, never a traceback, never "rebuild it")."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lcmtrt.cli.main import build_parser, main
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.devices import (DEVICE_HELP, onnxruntime_device, openvino_device, parse_device,
                                    tensorrt_device)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcmtrt"), err  # one line, never a traceback
    return err[0]


def refusal(call, *args) -> str:
    with pytest.raises(UserError) as e:
        call(*args)
    assert "\n" not in str(e.value) and "rebuild" not in str(e.value)
    return str(e.value)


# ---- the vocabulary ----------------------------------------------------------------------------------------------

def test_parse_is_case_insensitive_and_refuses_what_is_no_device_name() -> None:
    assert [parse_device(t) for t in ("CPU", " Cuda:0 ", "GPU.1", "AUTO:GPU,CPU", "npu")] == \
        ["cpu", "cuda:0", "gpu.1", "auto:gpu,cpu", "npu"]
    for text in ("", "cuda 0", "-cpu", "gpu.x", "cpu;rm"):
        assert "is not a device name; choose auto, cpu, cuda" in refusal(parse_device, text)


def test_tensorrt_runs_on_cuda_only() -> None:
    assert {tensorrt_device(d) for d in ("auto", "cuda", "CUDA", "cuda:0", "GPU")} == {"cuda"}
    line = refusal(tensorrt_device, "cpu")
    assert "cannot run this TensorRT bundle" in line and "auto, cuda or gpu" in line and "--backend onnxruntime" in line
    assert "CUDA_VISIBLE_DEVICES" in refusal(tensorrt_device, "cuda:1")
    assert "auto, cuda or gpu" in refusal(tensorrt_device, "NPU")


def test_onnxruntime_maps_to_its_providers() -> None:
    assert onnxruntime_device("CPU", "cuda", True) == "cpu"
    assert onnxruntime_device("auto", "cpu", True) == "cpu" and onnxruntime_device("Auto", "cuda", True) == "cuda"
    assert onnxruntime_device("GPU", "cpu", True) == onnxruntime_device("cuda:0", "cpu", True) == "cuda"
    assert "it runs on auto, cpu, cuda or gpu" in refusal(onnxruntime_device, "npu", "cpu", True)
    assert "it runs on auto or cpu (this ONNX Runtime has no CUDA provider)" in refusal(onnxruntime_device, "cuda",
                                                                                        "cpu", False)
    assert "use --device cpu" in refusal(onnxruntime_device, "auto", "cuda", False)
    assert "CUDA_VISIBLE_DEVICES" in refusal(onnxruntime_device, "cuda:1", "cpu", True)


def test_openvino_matches_its_devices_case_insensitively() -> None:
    here = ["CPU", "GPU.0", "GPU.1"]
    assert openvino_device("cpu", "CPU", here) == "CPU" and openvino_device("gpu.1", "CPU", here) == "GPU.1"
    assert openvino_device("gpu", "CPU", here) == "GPU"  # OpenVINO's first GPU
    assert openvino_device("auto", "GPU.1", here) == "GPU.1" and openvino_device("auto", "cpu", here) == "CPU"
    assert openvino_device("auto:gpu.1,cpu", "CPU", here) == "AUTO:GPU.1,CPU"
    assert openvino_device("auto", "AUTO", here) == "AUTO"  # a bundle built for OpenVINO's own AUTO device
    for device in ("cuda", "npu", "gpu.2", "hetero"):
        assert "it runs on auto, CPU, GPU.0, GPU.1" in refusal(openvino_device, device, "CPU", here)
    assert "targets device GPU" in refusal(openvino_device, "auto", "GPU", ["CPU"])


def test_infer_bench_and_serve_share_one_device_flag(capsys) -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("infer", "bench", "serve"):
        flag = next(a for a in commands.choices[command]._actions if "--device" in a.option_strings)
        assert flag.help == DEVICE_HELP and flag.default == "auto" and flag.type("GPU.1") == "gpu.1"
        with pytest.raises(SystemExit) as e:
            main([command, "--engines", "x", *(["a cat"] if command == "infer" else []), "--device", "cuda 0"])
        assert e.value.code == 2 and "is not a device name" in one_error_line(capsys)


# ---- end to end, through `lcmtrt` -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ov_bundle(tiny_sd15_bundle: Path) -> Path:
    pytest.importorskip("openvino")
    from conftest import on_backend

    return on_backend(tiny_sd15_bundle, "openvino")


def infer(bundle: Path, out: Path, *extra: str) -> int:
    return main(["-q", "infer", "--engines", str(bundle), "a cat", "--steps", "1", "--output", str(out), *extra])


def test_readme_command_on_an_openvino_bundle(ov_bundle: Path, tmp_path: Path) -> None:
    """README: `lcmtrt infer --engines artifacts/tiny-sd15 "a cat" --device cpu` on an OpenVINO bundle."""
    for device in ("cpu", "CPU", "Auto"):
        out = tmp_path / f"{device}.png"
        assert infer(ov_bundle, out, "--device", device) == 0
        with Image.open(out) as image:
            assert image.size == (64, 64)


def test_uppercase_cpu_on_an_onnxruntime_bundle(tiny_sd15_bundle: Path, tmp_path: Path) -> None:
    assert infer(tiny_sd15_bundle, tmp_path / "o.png", "--device", "CPU") == 0
    assert (tmp_path / "o.png").is_file()


def test_refused_devices_name_the_usable_ones(tiny_sd15_bundle: Path, ov_bundle: Path, tmp_path: Path,
                                               capsys) -> None:
    assert infer(tiny_sd15_bundle, tmp_path / "o.png", "--device", "NPU") == 2
    assert "--device npu cannot run this ONNX Runtime bundle; it runs on auto, cpu" in one_error_line(capsys)
    assert infer(ov_bundle, tmp_path / "o.png", "--device", "cuda") == 2
    assert "--device cuda cannot run this OpenVINO bundle; it runs on auto, CPU" in one_error_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_build_records_openvinos_name_of_its_device(tiny_sd15_bundle: Path, ov_bundle: Path, tmp_path: Path) -> None:
    """`build-engines --device cpu` targets OpenVINO's CPU: bundle.json says CPU, and `auto` then runs on it."""
    out = tmp_path / "ov-cpu"
    assert main(["-q", "build-engines", "--from", str(tiny_sd15_bundle), "--backend", "openvino", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads((out / "bundle.json").read_text())["build"]["ov_device"] == "CPU"
    assert infer(out, tmp_path / "o.png") == 0


def copy_as(bundle: Path, dest: Path, **changes) -> Path:
    """A copy of `bundle` whose bundle.json has `changes` (top-level keys; `build` entries are merged)."""
    copy = Path(shutil.copytree(bundle, dest))
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["build"].update(changes.pop("build", {}))
    manifest.update(changes)
    (copy / "bundle.json").write_text(json.dumps(manifest))
    return copy


def test_cpu_is_refused_for_a_tensorrt_bundle(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    """Refused before TensorRT is imported (it is not even installed here), where it used to run on the GPU."""
    trt = copy_as(tiny_sd15_bundle, tmp_path / "trt", backend="tensorrt", precision="fp16")
    assert infer(trt, tmp_path / "o.png", "--device", "cpu") == 2
    assert "--device cpu cannot run this TensorRT bundle; it runs on auto, cuda or gpu" in one_error_line(capsys)


def test_bench_and_serve_refuse_the_same_way(tiny_sd15_bundle: Path, tmp_path: Path, capsys) -> None:
    code = main(["-q", "bench", "--engines", str(tiny_sd15_bundle), "--device", "gpu.1", "--iterations", "1",
                 "--warmup", "0", "--steps", "1"])
    assert code == 2 and "--device gpu.1 cannot run this ONNX Runtime bundle" in one_error_line(capsys)
    pytest.importorskip("fastapi")
    code = main(["-q", "serve", "--engines", str(tiny_sd15_bundle), "--device", "NPU", "--host", "256.0.0.1"])
    assert code == 2 and "--device npu cannot run this ONNX Runtime bundle" in one_error_line(capsys)


@pytest.mark.parametrize("device", ["npu", "gpu.1"])
def test_build_refuses_a_device_its_backend_cannot_build_for(device: str, tmp_path: Path, capsys) -> None:
    """build-engines --device speaks the same vocabulary: ONNX Runtime builds for cpu or cuda only (before, any
    string was accepted and ignored)."""
    code = main(["-q", "build-engines", "--preset", "tiny-sd15", "--backend", "onnxruntime", "--device", device,
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ONNX Runtime" in err[0], err
    assert not (tmp_path / "x").exists()

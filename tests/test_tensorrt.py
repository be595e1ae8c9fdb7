"""TensorRT path: pure logic on CPU; building and running a real plan only where tensorrt and a CUDA GPU exist."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcmtrt.engines import tensorrt_build
from lcmtrt.engines.tensorrt_build import check_compatibility, parser_errors, tensorrt_available, write_atomic
from lcmtrt.runtime.errors import UserError

L4 = {"tensorrt_version": "10.8.0.43", "compute_capability": "8.9", "gpu_name": "NVIDIA L4"}


def test_module_imports_without_tensorrt() -> None:
    assert callable(tensorrt_build.build_plan) and callable(tensorrt_build.device_info)


def test_tensorrt_available_does_not_raise() -> None:
    assert isinstance(tensorrt_available(), bool)


def test_tensorrt_unavailable_without_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert tensorrt_available() is False
    else:
        pytest.skip("tensorrt is installed here")


def test_compatibility_accepts_identical_host() -> None:
    check_compatibility(dict(L4), dict(L4), "artifacts/x")


@pytest.mark.parametrize(
    "host, differs",
    [
        ({**L4, "tensorrt_version": "10.9.0.34"}, "TensorRT version 10.8.0.43 vs 10.9.0.34"),
        ({**L4, "compute_capability": "9.0", "gpu_name": "NVIDIA H100"}, "compute capability 8.9 vs 9.0"),
        ({**L4, "gpu_name": "NVIDIA L40S"}, "GPU NVIDIA L4 vs NVIDIA L40S"),  # same compute capability 8.9
    ],
)
def test_compatibility_refuses_other_version_architecture_or_gpu(host: dict, differs: str) -> None:
    with pytest.raises(UserError) as e:
        check_compatibility(dict(L4), host, "artifacts/x")
    message = str(e.value)
    assert "\n" not in message and "rebuild" in message and "artifacts/x" in message and differs in message


def test_compatibility_refuses_bundle_without_build_info() -> None:
    with pytest.raises(UserError, match="rebuild"):
        check_compatibility({}, dict(L4))


def _parser_error(node: int, name: str, op: str, desc: str) -> SimpleNamespace:
    return SimpleNamespace(node=lambda: node, node_name=lambda: name, node_operator=lambda: op, desc=lambda: desc)


def test_parser_errors_name_node_and_operator() -> None:
    errors = [
        _parser_error(7, "/unet/attn/Foo", "FooOp", "No importer registered for op: FooOp"),
        _parser_error(-1, "", "", "model has no graph"),
    ]
    text = parser_errors(errors)
    assert "node 7 '/unet/attn/Foo' (FooOp): No importer registered for op: FooOp" in text
    assert "graph: model has no graph" in text and "\n" not in text


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "trt" / "denoise.plan"
    write_atomic(target, b"old")
    write_atomic(target, memoryview(b"new plan"))
    assert target.read_bytes() == b"new plan"
    assert [p.name for p in target.parent.iterdir()] == ["denoise.plan"]


def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "denoise.plan"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # not bytes-like: fails mid-write
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["denoise.plan"]


# ---- GPU: a real plan built from a tiny ONNX graph -------------------------------------------------------------

WIDTH = 8  # 32-byte float32 rows: row views past the first are not 256-byte aligned


def _affine_onnx(path: Path) -> None:
    """y = x * 2 + 1 with a dynamic batch axis."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor(name, TensorProto.FLOAT, [], [v]) for name, v in (("two", 2.0), ("one", 1.0))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def trt_backend(tmp_path: Path):
    pytest.importorskip("tensorrt")
    if not tensorrt_available():
        pytest.skip("no CUDA device")
    from lcmtrt.runtime.backend_trt import TensorRTBackend
    from lcmtrt.runtime.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig

    _affine_onnx(tmp_path / "affine.onnx")
    profiles = [{"x": (1, WIDTH)}, {"x": (2, WIDTH)}]  # one static profile per bundle batch size, in order
    tensorrt_build.build_plan(tmp_path / "affine.onnx", tmp_path / "trt" / "affine.plan", profiles)
    io = (TensorSpec("x", "float32", ("batch", WIDTH)),), (TensorSpec("y", "float32", ("batch", WIDTH)),)
    bundle = Bundle(
        root=tmp_path, family="sd15", precision="fp32", backend="tensorrt", guidance_mode="embedding",
        height=64, width=64, batch_sizes=(1, 2), latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215,
        default_steps=4, default_guidance_scale=8.0, scheduler=SchedulerConfig(), text=TextConfig(("t.json",), (0,)),
        engines={"affine": EngineSpec("affine", "affine.onnx", "trt/affine.plan", *io, (1, 2))},
        build=tensorrt_build.device_info(),
    )
    backend = TensorRTBackend(bundle)
    yield backend
    backend.close()


@pytest.mark.gpu
def test_plan_runs_and_matches_numpy(trt_backend) -> None:
    x, y = trt_backend.alloc((2, WIDTH), "float32"), trt_backend.alloc((2, WIDTH), np.float32)
    binding = trt_backend.bind("affine", 2, {"x": x, "y": y})
    data = np.random.default_rng(0).standard_normal((2, WIDTH), dtype=np.float32)
    x.write(data)
    binding.run()
    np.testing.assert_allclose(y.read(), data * 2 + 1, rtol=1e-6)


@pytest.mark.gpu
def test_row_views_bind_only_when_aligned(trt_backend) -> None:
    x, y = trt_backend.alloc((2, 1, WIDTH), "float32"), trt_backend.alloc((3, 1, WIDTH), "float32")
    with pytest.raises(ValueError, match="aligned"):
        trt_backend.bind("affine", 1, {"x": x.row(1), "y": y.row(1)})
    binding = trt_backend.bind("affine", 1, {"x": x.row(0), "y": y.row(0)})  # row 0 starts the allocation
    data = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, 1, WIDTH)
    y.write(np.zeros((3, 1, WIDTH), np.float32))
    x.write(data)
    binding.run()
    out = y.read()
    np.testing.assert_allclose(out[0], data[0] * 2 + 1)
    np.testing.assert_allclose(out[1:], 0.0)  # neighbouring rows untouched


@pytest.mark.gpu
def test_captured_graph_replays_with_new_inputs(trt_backend) -> None:
    x, y = trt_backend.alloc((2, WIDTH), "float32"), trt_backend.alloc((2, WIDTH), "float32")
    binding = trt_backend.bind("affine", 2, {"x": x, "y": y})
    x.write(np.zeros((2, WIDTH), np.float32))
    replay = trt_backend.capture(binding.run)
    replay()  # runs eagerly on these inputs, then captures
    np.testing.assert_allclose(y.read(), 1.0)
    assert replay.captured and trt_backend.graph_count == 1, "capture fell back to eager launches"
    for value in (3.0, -2.0):
        x.write(np.full((2, WIDTH), value, np.float32))
        replay()
        np.testing.assert_allclose(y.read(), value * 2 + 1)


@pytest.mark.gpu
def test_bind_names_missing_and_mismatched_tensors(trt_backend) -> None:
    x, y = trt_backend.alloc((2, WIDTH), "float32"), trt_backend.alloc((2, WIDTH), "float32")
    with pytest.raises(ValueError, match="unbound tensors \\['y'\\]"):
        trt_backend.bind("affine", 2, {"x": x})
    with pytest.raises(ValueError, match="input x"):
        trt_backend.bind("affine", 1, {"x": x, "y": y})
    with pytest.raises(ValueError, match="batch size 3"):
        trt_backend.bind("affine", 3, {"x": x, "y": y})

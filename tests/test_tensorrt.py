"""TensorRT path: pure logic on CPU; building and running a real plan only where tensorrt and a CUDA GPU exist."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcmtrt.engines import tensorrt_build
from lcmtrt.engines.tensorrt_build import check_compatibility, parser_errors, tensorrt_available, write_atomic
from lcmtrt.errors import UserError

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
    from lcmtrt.runtime.backends.tensorrt import TensorRTBackend
    from lcmtrt.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig

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


# ---- GPU: two fp16 engines, one refittable (one plan per batch size), sharing scratch and one capture ------------

CHANNELS = 128  # 256-byte fp16 rows: every row view is aligned


def _scale_onnx(path: Path) -> None:
    """y = x * w + idx in fp16, with `w` a refittable initializer and `idx` an int32 input."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Cast", ["idx"], ["idx_h"], to=TensorProto.FLOAT16),
         helper.make_node("Add", ["xw", "idx_h"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", CHANNELS]),
         helper.make_tensor_value_info("idx", TensorProto.INT32, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", CHANNELS])],
        [numpy_helper.from_array(np.full(CHANNELS, 2.0, np.float16), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _quantize_onnx(path: Path) -> None:
    """uint8 = Cast(Round(Clip(float(y), 0, 255))): the VAE decoder's output conversion."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT), helper.make_node("Clip", ["y32", "lo", "hi"], ["c"]),
         helper.make_node("Round", ["c"], ["r"]), helper.make_node("Cast", ["r"], ["images"], to=TensorProto.UINT8)],
        "quantize",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", CHANNELS])],
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", CHANNELS])],
        [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(255), "hi")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def trt_two_engines(tmp_path: Path):
    pytest.importorskip("tensorrt")
    if not tensorrt_available():
        pytest.skip("no CUDA device")
    from lcmtrt.runtime.backends.tensorrt import TensorRTBackend
    from lcmtrt.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig

    _scale_onnx(tmp_path / "scale.onnx")
    _quantize_onnx(tmp_path / "quantize.onnx")
    cache = tensorrt_build.timing_cache_path(tmp_path)
    layout = tensorrt_build.plan_layout("scale", (1, 2), refittable=True)
    for artifact, (batch,) in layout:
        tensorrt_build.build_plan(tmp_path / "scale.onnx", tmp_path / artifact,
                                  [{"x": (batch, CHANNELS), "idx": (batch, 1)}], timing_cache=cache, refittable=True)
    assert cache.is_file() and cache.stat().st_size > 0
    tensorrt_build.build_plan(tmp_path / "quantize.onnx", tmp_path / "trt" / "quantize.plan",
                              [{"y": (b, CHANNELS)} for b in (1, 2)], timing_cache=cache)
    row = ("batch", CHANNELS)
    engines = {
        "scale": EngineSpec("scale", "scale.onnx", layout[0][0], (TensorSpec("x", "float16", row),
                            TensorSpec("idx", "int32", ("batch", 1))), (TensorSpec("y", "float16", row),), (1, 2),
                            ("w",), tuple(a for a, _ in layout)),
        "quantize": EngineSpec("quantize", "quantize.onnx", "trt/quantize.plan", (TensorSpec("y", "float16", row),),
                               (TensorSpec("images", "uint8", row),), (1, 2)),
    }
    bundle = Bundle(
        root=tmp_path, family="sd15", precision="fp16", backend="tensorrt", guidance_mode="embedding",
        height=64, width=64, batch_sizes=(1, 2), latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215,
        default_steps=4, default_guidance_scale=8.0, scheduler=SchedulerConfig(), text=TextConfig(("t.json",), (0,)),
        engines=engines, build=tensorrt_build.device_info(),
    )
    backend = TensorRTBackend(bundle)
    yield backend
    backend.close()


def _chain(backend, batch: int):
    x, idx = backend.alloc((batch, CHANNELS), np.float16), backend.alloc((batch, 1), np.int32)
    y, images = backend.alloc((batch, CHANNELS), np.float16), backend.alloc((batch, CHANNELS), np.uint8)
    scale = backend.bind("scale", batch, {"x": x, "idx": idx, "y": y})
    quantize = backend.bind("quantize", batch, {"y": y, "images": images})

    def launch() -> None:
        scale.run()
        quantize.run()

    return x, idx, images, backend.capture(launch)


@pytest.mark.gpu
def test_two_fp16_engines_share_scratch_in_one_graph_and_refit(trt_two_engines) -> None:
    backend = trt_two_engines
    assert [len(backend.plans[n]) for n in ("scale", "quantize")] == [2, 1]
    chains = {batch: _chain(backend, batch) for batch in (1, 2)}  # four contexts on one scratch allocation
    rng = np.random.default_rng(0)
    for w in (2.0, 3.0):
        for _ in range(2):  # the first call runs eagerly and captures, the second replays
            for batch, (x, idx, images, launch) in chains.items():
                data = rng.uniform(0, 40, (batch, CHANNELS)).astype(np.float16)
                rows = rng.integers(0, 5, (batch, 1), dtype=np.int32)
                x.write(data)
                idx.write(rows)
                launch()
                expected = np.clip(np.round(data.astype(np.float32) * w + rows), 0, 255).astype(np.uint8)
                np.testing.assert_allclose(images.read().astype(int), expected.astype(int), atol=1)
                assert launch.captured, "capture fell back to eager launches"
        assert backend.graph_count == 2
        backend.refit({"scale": {"w": np.full(CHANNELS, 3.0, np.float16)}})
        assert backend.graph_count == 0  # dropped by the refit, captured again on the next call

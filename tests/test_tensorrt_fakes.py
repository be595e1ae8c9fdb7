"""The TensorRT backend and build helpers against fake `tensorrt` and `cuda.bindings` modules (tests/fake_trt.py):
call order, one plan per batch size for refittable engines, refit checks and memory, lazy capture, error paths."""

from __future__ import annotations

import gc
import logging
import sys
import tomllib
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fake_trt
from lcmtrt.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig
from lcmtrt.errors import RefitError, UserError

ROOT = Path(__file__).resolve().parent.parent
TEXT_IO = {"input_ids": ["INPUT", "int32", ["batch", 4]], "embeds": ["OUTPUT", "float16", ["batch", 128]]}
DECODE_IO = {"embeds": ["INPUT", "float16", ["batch", 128]], "images": ["OUTPUT", "uint8", ["batch", 256]]}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    state = fake_trt.install(monkeypatch)
    yield state
    from lcmtrt.engines import tensorrt_build

    tensorrt_build.trt_logger.cache_clear()
    sys.modules.pop("lcmtrt.runtime.backends.tensorrt", None)


def _specs(io: dict) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    specs = {mode: tuple(TensorSpec(n, d, tuple(s)) for n, (m, d, s) in io.items() if m == mode)
             for mode in ("INPUT", "OUTPUT")}
    return specs["INPUT"], specs["OUTPUT"]


def fake_bundle(root: Path, split_text: bool = True, text_profiles_per_plan: int = 1) -> Bundle:
    """Two engines at batch 1 and 2: a refittable `text` with one plan per batch size, a `decode` with one plan of
    two profiles."""
    plans = ("trt/text.b1.plan", "trt/text.b2.plan") if split_text else ()
    for path, batch in zip(plans, (1, 2)):
        fake_trt.write_plan(root / path, "text", TEXT_IO, [batch] * text_profiles_per_plan, {"w": 128}, True)
    fake_trt.write_plan(root / "trt/decode.plan", "decode", DECODE_IO, [1, 2])
    engines = {
        "text": EngineSpec("text", "onnx/text.onnx", plans[0] if plans else "trt/text.plan", *_specs(TEXT_IO), (1, 2),
                           ("w",), plans),
        "decode": EngineSpec("decode", "onnx/decode.onnx", "trt/decode.plan", *_specs(DECODE_IO), (1, 2)),
    }
    from lcmtrt.engines.tensorrt_build import device_info

    return Bundle(root=root, family="sd15", precision="fp16", backend="tensorrt", guidance_mode="embedding",
                  height=64, width=64, batch_sizes=(1, 2), latent_channels=4, vae_scale_factor=8,
                  vae_scaling_factor=0.18215, default_steps=4, default_guidance_scale=8.0,
                  scheduler=SchedulerConfig(), text=TextConfig(("t.json",), (0,)), engines=engines,
                  build=device_info())


def open_backend(root: Path, **kwargs):
    from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(fake_bundle(root, **kwargs))


def bind_chain(backend, batch: int):
    ids, embeds = backend.alloc((batch, 4), np.int32), backend.alloc((batch, 128), np.float16)
    images = backend.alloc((batch, 256), np.uint8)
    text = backend.bind("text", batch, {"input_ids": ids, "embeds": embeds})
    decode = backend.bind("decode", batch, {"embeds": embeds, "images": images})

    def launch() -> None:
        text.run()
        decode.run()

    return launch


# ---- 1, 2: cuda-python versions and drivers ---------------------------------------------------------------------

def test_backend_opens_without_cuda_bindings_utils(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_trt.install(monkeypatch, with_utils=False)  # cuda-python < 12.9.1 has no cuda.bindings.utils
    try:
        backend = open_backend(tmp_path)
        assert backend.stream_handle == fake_trt.FakeStream.handle
        backend.close()
    finally:
        sys.modules.pop("lcmtrt.runtime.backends.tensorrt", None)


def test_tensorrt_extras_match_cuda_python_to_the_wheels_cuda_major() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cu12, cu13 = " ".join(extras["tensorrt"]), " ".join(extras["tensorrt-cu13"])
    assert "tensorrt-cu12>=10.1,<12" in cu12 and "cuda-python>=12.9.1,<13" in cu12  # 12.9.1: cuda.bindings.utils
    assert "tensorrt-cu13>=" in cu13 and "cuda-python>=13" in cu13 and "<14" in cu13


def test_old_driver_is_named_not_hidden(fake, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    from lcmtrt.engines import openvino_build
    from lcmtrt.engines.build import resolve_backend

    monkeypatch.setattr(openvino_build, "openvino_available", lambda: False)  # the CPU fallback is ONNX Runtime
    from lcmtrt.engines.tensorrt_build import tensorrt_available, tensorrt_unavailable_reason

    fake.device_count_error = fake_trt.cudaError_t.cudaErrorInsufficientDriver
    assert not tensorrt_available() and "cudaErrorInsufficientDriver" in tensorrt_unavailable_reason()
    with pytest.raises(UserError, match="cudaErrorInsufficientDriver") as e:
        resolve_backend("tensorrt")
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="lcmtrt"):
        assert resolve_backend("auto") == "onnxruntime"
    assert "cudaErrorInsufficientDriver" in caplog.text


# ---- 3: refittable engines have one optimization profile ---------------------------------------------------------

def test_refittable_engines_get_one_plan_per_batch_size(fake, tmp_path: Path) -> None:
    from lcmtrt.engines.tensorrt_build import build_plan, plan_layout

    assert plan_layout("text", (1, 2), refittable=True) == [("trt/text.b1.plan", (1,)), ("trt/text.b2.plan", (2,))]
    assert plan_layout("text", (1, 2), refittable=False) == [("trt/text.plan", (1, 2))]
    assert plan_layout("denoise", (4,), refittable=True) == [("trt/denoise.plan", (4,))]
    (tmp_path / "text.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="one optimization profile"):
        build_plan(tmp_path / "text.onnx", tmp_path / "text.plan", [{"x": (1,)}, {"x": (2,)}], refittable=True)


def test_split_plans_bind_by_batch(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    assert [e.profiles for e in backend.plans["text"]] == [[1], [2]]
    launch = bind_chain(backend, 2)
    launch()
    assert fake.executed == ["text", "decode"]
    backend.close()


def test_refittable_plan_with_several_profiles_is_refused(fake, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="2 optimization profiles .* expects 1"):
        open_backend(tmp_path, text_profiles_per_plan=2)


# ---- 4, 5, 6: refit -----------------------------------------------------------------------------------------------

def weights(value: float) -> dict[str, dict[str, np.ndarray]]:
    return {"text": {"w": np.full(128, value, np.float16)}}


def test_refit_checks_missing_weights_before_changing_anything(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    fake.missing_weights = ["text_encoder.layer.1.bias"]
    with pytest.raises(RefitError, match="also needs weights") as e:
        backend.refit(weights(1.0))
    assert not e.value.changed and fake.refits == []
    assert all(not plan.weights["w"].any() for plan in backend.plans["text"])


def test_failed_refit_says_weights_changed(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    fake.refit_fails = True
    with pytest.raises(RefitError, match="partly replaced") as e:
        backend.refit(weights(1.0))
    assert e.value.changed


def test_pipeline_is_unusable_after_a_half_applied_swap() -> None:
    from lcmtrt.runtime.pipeline import Pipeline

    def refit(weights: dict) -> None:
        raise RefitError("TensorRT could not refit denoise", changed=True)

    pipeline = Pipeline.__new__(Pipeline)  # only the swap's state: no engines run
    pipeline.bundle = SimpleNamespace(engines={"denoise": SimpleNamespace(refit_weights=("w",))}, root="b")
    pipeline.backend = SimpleNamespace(name="tensorrt", refit=refit)
    pipeline._unusable = None
    with pytest.raises(RefitError):
        pipeline.refit({})
    with pytest.raises(UserError, match="unusable.*load the bundle again"):
        pipeline.generate(["a fox"])
    with pytest.raises(UserError, match="unusable"):
        pipeline.refit({})


def test_refit_keeps_no_reference_to_the_weights(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    new = weights(2.0)
    alive = weakref.ref(new["text"]["w"])
    backend.refit(new)
    assert all((plan.weights["w"] == 2.0).all() for plan in backend.plans["text"])  # every plan of the engine
    del new
    gc.collect()
    assert alive() is None, "the backend keeps the refit weights alive"


def test_swaps_keep_buffers_and_contexts_and_recapture_one_graph(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    replay = backend.capture(bind_chain(backend, 2))
    replay()
    allocations, contexts = len(fake.device_allocs), fake.contexts_created
    for i in range(10):
        backend.refit(weights(float(i)))
        replay()
        assert replay.captured and backend.graph_count == 1
        assert fake.graphs_alive == fake.graph_execs_alive == 1
    assert (len(fake.device_allocs), fake.contexts_created) == (allocations, contexts)
    backend.close()
    assert fake.graphs_alive == fake.graph_execs_alive == 0 and not fake.device_allocs and not fake.host_allocs


# ---- 7, 8: capture ------------------------------------------------------------------------------------------------

def test_first_call_runs_the_work_once_then_replays(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    replay = backend.capture(bind_chain(backend, 1))
    assert fake.executed == []  # capturing is deferred to the first call, after its inputs are written
    replay()
    assert fake.executed == ["text", "decode"] and replay.captured
    replay()
    assert fake.executed == ["text", "decode"] * 2


def test_failed_capture_falls_back_to_eager_launches(fake, tmp_path: Path, caplog) -> None:
    backend = open_backend(tmp_path)
    fake.capture_fails = True
    replay = backend.capture(bind_chain(backend, 1))
    with caplog.at_level(logging.WARNING):
        replay()
        replay()
    assert not replay.captured and backend.graph_count == 0 and fake.graphs_alive == 0
    assert fake.executed == ["text", "decode"] * 2 and "capture failed" in caplog.text


# ---- 9: shapes, timing cache --------------------------------------------------------------------------------------

def test_infer_shapes_failure_is_a_value_error(fake, tmp_path: Path) -> None:
    backend = open_backend(tmp_path)
    fake.infer_shapes_raises = True
    with pytest.raises(ValueError, match="engine text: TensorRT cannot infer its output shapes"):
        bind_chain(backend, 1)


def test_timing_cache_is_keyed_by_tensorrt_version(fake, tmp_path: Path) -> None:
    from lcmtrt.engines.tensorrt_build import timing_cache_path

    assert timing_cache_path(tmp_path) == tmp_path / ".lcmtrt-timing-10.13.0.35.cache"
    build = (ROOT / "lcmtrt" / "engines" / "build.py").read_text()
    assert "timing_cache=timing_cache_path(" in build and ".lcmtrt-timing.cache" not in build


# ---- --device: TensorRT runs on the first visible CUDA GPU only (lcmtrt/runtime/backends/devices.py) ----------------------

def test_device_names_of_the_gpu_open_and_others_are_refused_before_cuda(fake, tmp_path: Path) -> None:
    from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

    for device in ("auto", "CUDA", "gpu", "cuda:0"):
        TensorRTBackend(fake_bundle(tmp_path), device).close()
    for device in ("cpu", "cuda:1", "NPU"):
        with pytest.raises(UserError, match=f"--device {device.lower()} cannot run this TensorRT bundle; it runs on "
                                            "auto, cuda or gpu"):
            TensorRTBackend(fake_bundle(tmp_path), device)
        assert not fake.device_allocs  # refused before any CUDA call

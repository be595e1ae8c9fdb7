"""ONNX Runtime backend logic that needs no GPU: the CUDA provider's CUDA graphs (enable_cuda_graph) with their
fallback, one graph id per bound address set, and rebinding after a weight swap. InferenceSession is replaced by a
recorder; the real CPU path is covered by the parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcmtrt.runtime.backends import onnxruntime as backend_ort
from lcmtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtBuffer
from lcmtrt.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig
from lcmtrt.errors import RefitError


class FakeIoBinding:
    def __init__(self) -> None:
        self.bound: list[tuple[str, int]] = []

    def bind_input(self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int) -> None:
        self.bound.append((name, ptr))

    bind_output = bind_input

    def clear_binding_inputs(self) -> None:
        self.bound = [b for b in self.bound if b[0] != "x"]

    def clear_binding_outputs(self) -> None:
        self.bound = [b for b in self.bound if b[0] != "y"]


class FakeSession:
    """Records its providers; refuses enable_cuda_graph for engines named in `no_graph` as ONNX Runtime does for
    graphs with nodes off the CUDA provider."""

    no_graph: set[str] = set()
    fail: set[str] = set()

    def __init__(self, path: str, options: Any, providers: list) -> None:
        name = Path(path).stem
        self.graphed = any(isinstance(p, tuple) and p[1].get("enable_cuda_graph") == "1" for p in providers)
        if (self.graphed and name in self.no_graph) or name in self.fail:
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all "
                               "compute graph nodes have not been partitioned to the CUDA EP.")
        self.runs: list[tuple[FakeIoBinding, Any]] = []

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self) -> FakeIoBinding:
        return FakeIoBinding()

    def run_with_iobinding(self, io: FakeIoBinding, run_options: Any = None) -> None:
        self.runs.append((io, run_options))


def bundle(root: Path) -> Bundle:
    io = (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),)
    engines = {n: EngineSpec(n, f"onnx/{n}.onnx", f"ort/{n}.onnx", *io, (1,), ("w",)) for n in ("unet", "vae")}
    return Bundle(root=root, family="sd15", precision="fp16", backend="onnxruntime", guidance_mode="embedding",
                  height=64, width=64, batch_sizes=(1,), latent_channels=4, vae_scale_factor=8,
                  vae_scaling_factor=0.18215, default_steps=4, default_guidance_scale=8.0,
                  scheduler=SchedulerConfig(), text=TextConfig(("t.json",), (0,)), engines=engines,
                  build={"ort_device": "cuda"})


@pytest.fixture
def cuda_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(backend_ort.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(backend_ort.ort, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                             "CPUExecutionProvider"])
    monkeypatch.setattr(FakeSession, "no_graph", {"vae"})
    monkeypatch.setattr(FakeSession, "fail", set())
    return OnnxRuntimeBackend(bundle(tmp_path), "cuda")


def buffers(base: int) -> dict[str, OrtBuffer]:
    return {"x": OrtBuffer((1, 4), np.float32, "cuda", ptr=base), "y": OrtBuffer((1, 4), np.float32, "cuda",
                                                                                ptr=base + 256)}


def graph_id(binding: Any) -> str | None:
    return None if binding.run_options is None else binding.run_options.get_run_config_entry("gpu_graph_id")


def test_cuda_graphs_where_the_provider_allows_them(cuda_backend) -> None:
    assert cuda_backend.cuda_graph_engines == {"unet"}  # vae was refused and runs without
    assert cuda_backend.sessions["unet"].graphed and not cuda_backend.sessions["vae"].graphed
    steps = [cuda_backend.bind("unet", 1, buffers(base)) for base in (4096, 8192)]
    vae = cuda_backend.bind("vae", 1, buffers(16384))
    assert [graph_id(b) for b in steps] == ["1", "2"] and graph_id(vae) is None  # one graph per address set
    steps[1].run()
    io, options = cuda_backend.sessions["unet"].runs[-1]
    assert io.bound == [("x", 8192), ("y", 8192 + 256)] and options is steps[1].run_options


def test_cpu_provider_never_asks_for_cuda_graphs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backend_ort.ort, "InferenceSession", FakeSession)
    backend = OnnxRuntimeBackend(bundle(tmp_path), "cpu")
    assert backend.cuda_graph_engines == set() and not backend.sessions["unet"].graphed


def test_refit_rebinds_the_same_buffers_to_the_new_session(cuda_backend) -> None:
    binding = cuda_backend.bind("unet", 1, buffers(4096))
    old = cuda_backend.sessions["unet"]
    cuda_backend.refit({"unet": {"w": np.ones(4, np.float32)}})
    new = cuda_backend.sessions["unet"]
    assert new is not old and new.graphed and binding.session is new
    binding.run()
    assert new.runs[-1][0].bound == [("x", 4096), ("y", 4096 + 256)] and old.runs == []


def test_refit_failure_after_a_swapped_engine_says_so(cuda_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeSession, "fail", {"vae"})
    with pytest.raises(RefitError) as e:
        cuda_backend.refit({"unet": {"w": np.ones(4, np.float32)}, "vae": {"w": np.ones(4, np.float32)}})
    assert e.value.changed
    with pytest.raises(RefitError) as e:
        cuda_backend.refit({"vae": {"w": np.ones(4, np.float32)}})
    assert not e.value.changed


def test_released_cuda_graphs_are_freed_with_their_session(cuda_backend) -> None:
    """ONNX Runtime cannot free one captured graph, so evicted step programs' graphs pile up in the session: once
    they outnumber the live ones (and DEAD_GRAPHS_KEPT), the session is replaced and the live bindings move to the
    new one under new graph ids. Over many programs the graphs held stay bounded."""
    kept = cuda_backend.bind("unet", 1, buffers(4096))
    first = cuda_backend.sessions["unet"]
    sessions = {id(first)}
    for i in range(5 * backend_ort.DEAD_GRAPHS_KEPT):
        cuda_backend.bind("unet", 1, buffers(8192 + 512 * i)).release()  # an evicted program's step
        sessions.add(id(cuda_backend.sessions["unet"]))
        assert cuda_backend._dead_graphs["unet"] <= backend_ort.DEAD_GRAPHS_KEPT
    assert len(sessions) >= 4  # replaced again and again: each old session took its dead graphs with it
    assert kept.session is cuda_backend.sessions["unet"] is not first and cuda_backend.sessions["unet"].graphed
    assert graph_id(kept) != "1"  # a new id: it captures again on the new session
    kept.run()
    assert cuda_backend.sessions["unet"].runs[-1][0].bound == [("x", 4096), ("y", 4096 + 256)]

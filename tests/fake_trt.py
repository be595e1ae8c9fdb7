"""Fake `tensorrt` and `cuda.bindings.runtime` modules for CPU tests of the TensorRT path: call order, capture,
refit and error paths. Plans are JSON files that describe their engine; nothing is computed. The fakes follow the
TensorRT 10/11 Python API and cuda-python's tuple-returning convention as far as the runtime uses them."""

from __future__ import annotations

import ctypes
import enum
import gc
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 512


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorStreamCaptureInvalidated = 901


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    UINT8 = 5


NPTYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.UINT8: np.uint8}
DTYPES = {np.dtype(v): k for k, v in NPTYPES.items()}


@dataclass
class FakeCuda:
    """What the fake device saw: every engine execution outside a capture (or replayed from a graph), allocations,
    contexts, graphs alive, refits."""

    executed: list[str] = field(default_factory=list)
    device_count_error: cudaError_t = cudaError_t.cudaSuccess
    capture_fails: bool = False  # execute_async_v3 returns False while capturing
    infer_shapes_raises: bool = False
    missing_weights: list[str] = field(default_factory=list)
    refit_fails: bool = False  # refit_cuda_engine returns False after applying part of the weights
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    next_ptr: int = 1 << 20
    device_allocs: dict[int, int] = field(default_factory=dict)
    host_allocs: dict[int, Any] = field(default_factory=dict)
    contexts_created: int = 0
    contexts_alive: int = 0  # created and not yet destroyed (TensorRT destroys a context with its last reference)
    graphs_alive: int = 0
    graph_execs_alive: int = 0
    capturing: list[str] | None = None
    refits: list[str] = field(default_factory=list)


STATE = FakeCuda()


# ---- tensorrt ---------------------------------------------------------------------------------------------------

class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class Weights:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # the real binding keeps a pointer, not a copy
        self.size = array.size


def nptype(dtype: DataType) -> type:
    return NPTYPES[dtype]


class FakeEngine:
    """From a plan's JSON: {"name", "tensors": {name: [mode, dtype, shape with "batch"]}, "profiles": [batch, ...],
    "weights": {name: size}, "refittable": bool}."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.tensors = spec["tensors"]
        self.profiles = spec["profiles"]
        self.weights = {n: np.zeros(size, np.float16) for n, size in spec.get("weights", {}).items()}
        self.refittable = spec.get("refittable", False)
        self.device_memory_size_v2 = spec.get("scratch", 4096)

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode[self.tensors[name][0]]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DTYPES[np.dtype(self.tensors[name][1])]

    def shape(self, name: str, profile: int) -> tuple[int, ...]:
        batch = self.profiles[profile]
        return tuple(batch if d == "batch" else int(d) for d in self.tensors[name][2])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [self.shape(name, profile)] * 3

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy) -> FakeContext:
        STATE.contexts_created += 1
        return FakeContext(self, strategy)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.state = STATE  # destroyed into the state that counted it, even after install() made a new one
        STATE.contexts_alive += 1
        self.profile: int | None = None
        self.scratch: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def __del__(self) -> None:
        self.state.contexts_alive -= 1

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert ptr in _allocation_containing(ptr) and size >= self.engine.device_memory_size_v2
        self.scratch = (ptr, size)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        if not 0 <= profile < self.engine.num_optimization_profiles:
            raise RuntimeError(f"profile {profile} out of range")
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert self.profile is not None, "set_optimization_profile_async must precede set_input_shape"
        if tuple(shape) != self.engine.shape(name, self.profile):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> list[str]:
        if STATE.infer_shapes_raises:
            raise RuntimeError("IExecutionContext::inferShapes: Error Code 7: Internal Error")
        return []

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.engine.shape(name, self.profile)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert self.scratch is not None and len(self.addresses) == self.engine.num_io_tensors
        if STATE.capturing is not None:
            if STATE.capture_fails:
                return False
            STATE.capturing.append(self.engine.name)
        else:
            STATE.executed.append(self.engine.name)
        return True


class Refitter:
    def __init__(self, engine: FakeEngine, logger: Any) -> None:
        assert engine.refittable, "Refitter on a non-refittable engine"
        self.engine, self.logger = engine, logger
        self.pending: dict[str, Weights] = {}

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        current = self.engine.weights.get(name)
        if current is None or current.size != weights.size:
            self.logger.log(ILogger.Severity.ERROR, f"setNamedWeights: {name} is not refittable or has another size")
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        return list(STATE.missing_weights)

    def refit_cuda_engine(self) -> bool:
        assert STATE.capturing is None, "refit during capture"
        names = list(self.pending)
        applied = names[: len(names) // 2] if STATE.refit_fails else names
        for name in applied:
            self.engine.weights[name] = np.array(self.pending[name].array, np.float16)
        STATE.refits.append(self.engine.name)
        if STATE.refit_fails:
            self.logger.log(ILogger.Severity.ERROR, "refitCudaEngine: weights validation failed")
        return not STATE.refit_fails


class Runtime:
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
        try:
            return FakeEngine(json.loads(plan))
        except ValueError:
            self.logger.log(ILogger.Severity.ERROR, "deserializeCudaEngine: not a plan")
            return None


# ---- cuda.bindings.runtime --------------------------------------------------------------------------------------

def _allocation_containing(ptr: int) -> dict[int, int]:
    return {base: size for base, size in STATE.device_allocs.items() if base <= ptr < base + size}


def _ok(*out: Any) -> tuple[Any, ...]:
    return (cudaError_t.cudaSuccess, *out)


def cudaGetErrorName(err: cudaError_t) -> tuple[Any, bytes]:
    return _ok(cudaError_t(err).name.encode())


def cudaGetDeviceCount() -> tuple[Any, ...]:
    return (STATE.device_count_error, 0 if STATE.device_count_error else 1)


def cudaGetDeviceProperties(device: int) -> tuple[Any, ...]:
    props = types.SimpleNamespace(name=STATE.gpu_name.encode() + b"\x00" * 8, major=9, minor=0,
                                  totalGlobalMem=80 << 30)
    return _ok(props)


def cudaMalloc(size: int) -> tuple[Any, int]:
    ptr = STATE.next_ptr
    STATE.next_ptr += -(-size // ALIGN) * ALIGN + ALIGN
    STATE.device_allocs[ptr] = size
    return _ok(ptr)


def cudaFree(ptr: int) -> tuple[Any]:
    del STATE.device_allocs[ptr]
    return _ok()


def cudaMallocHost(size: int) -> tuple[Any, int]:
    buffer = (ctypes.c_byte * size)()
    STATE.host_allocs[ctypes.addressof(buffer)] = buffer
    return _ok(ctypes.addressof(buffer))


def cudaFreeHost(ptr: int) -> tuple[Any]:
    del STATE.host_allocs[ptr]
    return _ok()


def cudaStreamBeginCapture(stream: Any, mode: Any) -> tuple[Any]:
    assert STATE.capturing is None
    STATE.capturing = []
    return _ok()


def cudaStreamEndCapture(stream: Any) -> tuple[Any, Any]:
    recorded, STATE.capturing = STATE.capturing, None
    if STATE.capture_fails:
        return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    STATE.graphs_alive += 1
    return _ok(list(recorded))


def cudaGraphInstantiate(graph: list[str], flags: int) -> tuple[Any, Any]:
    STATE.graph_execs_alive += 1
    return _ok(("exec", list(graph)))


def cudaGraphLaunch(graph_exec: tuple[str, list[str]], stream: Any) -> tuple[Any]:
    STATE.executed.extend(graph_exec[1])
    return _ok()


def cudaGraphDestroy(graph: Any) -> tuple[Any]:
    STATE.graphs_alive -= 1
    return _ok()


def cudaGraphExecDestroy(graph_exec: Any) -> tuple[Any]:
    STATE.graph_execs_alive -= 1
    return _ok()


class FakeStream:
    """cudaStream_t: int() works on cuda-python 12 (deprecated on 13), get_cuda_native_handle from 12.9.1."""

    handle = 7

    def __int__(self) -> int:
        return self.handle


def _cudart_module() -> types.ModuleType:
    m = types.ModuleType("cuda.bindings.runtime")
    m.cudaError_t = cudaError_t
    m.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    m.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)
    m.cudaStreamNonBlocking, m.cudaEventDisableTiming = 1, 2
    for fn in (cudaGetErrorName, cudaGetDeviceCount, cudaGetDeviceProperties, cudaMalloc, cudaFree, cudaMallocHost,
               cudaFreeHost, cudaStreamBeginCapture, cudaStreamEndCapture, cudaGraphInstantiate, cudaGraphLaunch,
               cudaGraphDestroy, cudaGraphExecDestroy):
        setattr(m, fn.__name__, fn)
    simple = {
        "cudaRuntimeGetVersion": lambda: _ok(13000), "cudaDriverGetVersion": lambda: _ok(13000),
        "cudaStreamCreateWithFlags": lambda flags: _ok(FakeStream()),
        "cudaStreamSynchronize": lambda s: _ok(), "cudaStreamDestroy": lambda s: _ok(),
        "cudaEventCreateWithFlags": lambda flags: _ok(object()), "cudaEventCreate": lambda: _ok(object()),
        "cudaEventRecord": lambda e, s: _ok(), "cudaEventSynchronize": lambda e: _ok(),
        "cudaEventDestroy": lambda e: _ok(), "cudaEventElapsedTime": lambda a, b: _ok(1.0),
        "cudaMemcpyAsync": lambda dst, src, n, kind, s: _ok(), "cudaGetLastError": lambda: _ok(),
        "cudaMemGetInfo": lambda: _ok(1 << 30, 80 << 30),
    }
    for name, fn in simple.items():
        fn.__name__ = name
        setattr(m, name, fn)
    return m


def _tensorrt_module(version: str) -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    for obj in (DataType, TensorIOMode, ExecutionContextAllocationStrategy, ILogger, Weights, Runtime, Refitter,
                nptype):
        setattr(m, obj.__name__, obj)
    m.Logger = ILogger
    return m


def install(monkeypatch: Any, version: str = "10.13.0.35", with_utils: bool = True) -> FakeCuda:
    """Put the fakes into sys.modules (undone by monkeypatch) and return the fresh device state."""
    global STATE
    gc.collect()  # backends of earlier tests free their fake graphs and memory into the old state, not the new one
    STATE = FakeCuda()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    runtime = _cudart_module()
    cuda.bindings, bindings.runtime = bindings, runtime
    modules = {"tensorrt": _tensorrt_module(version), "cuda": cuda, "cuda.bindings": bindings,
               "cuda.bindings.runtime": runtime}
    if with_utils:  # cuda.bindings.utils first exists in cuda-python 12.9.1
        utils = types.ModuleType("cuda.bindings.utils")
        utils.get_cuda_native_handle = lambda obj: obj.handle
        bindings.utils = utils
        modules["cuda.bindings.utils"] = utils
    else:
        monkeypatch.delitem(sys.modules, "cuda.bindings.utils", raising=False)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "lcmtrt.runtime.backends.tensorrt", raising=False)
    from lcmtrt.engines import tensorrt_build

    tensorrt_build.trt_logger.cache_clear()  # the cached logger subclasses the real or an earlier fake ILogger
    return STATE


def write_plan(path: Path, name: str, tensors: dict[str, list[Any]], profiles: list[int],
               weights: dict[str, int] | None = None, refittable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "tensors": tensors, "profiles": profiles, "weights": weights or {},
                                "refittable": refittable}))


PIPELINE_IO = {  # a whole text-to-image / image-to-image bundle at 16x16 (latents 4x2x2), prompts of 8 tokens
    "text": {"input_ids": ["INPUT", "int32", ["batch", 8]], "prompt_embeds": ["OUTPUT", "float32", ["batch", 8, 4]]},
    "denoise": {"latents": ["INPUT", "float32", ["batch", 4, 2, 2]], "coeffs": ["INPUT", "float32", [8]],
                "noise": ["INPUT", "float32", ["batch", 4, 2, 2]], "prompt_embeds": ["INPUT", "float32", ["batch", 8, 4]],
                "guidance_scale": ["INPUT", "float32", ["batch"]],
                "next_latents": ["OUTPUT", "float32", ["batch", 4, 2, 2]],
                "denoised": ["OUTPUT", "float32", ["batch", 4, 2, 2]]},
    "vae_encode": {"images": ["INPUT", "uint8", ["batch", 16, 16, 3]], "coeffs": ["INPUT", "float32", [8]],
                   "noise": ["INPUT", "float32", ["batch", 4, 2, 2]],
                   "sample_noise": ["INPUT", "float32", ["batch", 4, 2, 2]],
                   "latents": ["OUTPUT", "float32", ["batch", 4, 2, 2]]},
    "vae_decode": {"latents": ["INPUT", "float32", ["batch", 4, 2, 2]], "images": ["OUTPUT", "uint8", ["batch", 16, 16, 3]]},
}


def pipeline_bundle(root: Path, batch_sizes: tuple[int, ...] = (1, 2)) -> Any:
    """A TensorRT bundle a real Pipeline runs on the fakes (after install()): fake plans of every stage, one profile
    per batch size, and a word-level tokenizer. Nothing is computed: images come back as zeros."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lcmtrt.bundle import Bundle, EngineSpec, SchedulerConfig, TensorSpec, TextConfig
    from lcmtrt.runtime.backends.tensorrt_host import device_info

    root.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "a", "fox", "cat", "warm", "up"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(root / "tokenizer.json"))
    engines = {}
    for name, io in PIPELINE_IO.items():
        write_plan(root / f"trt/{name}.plan", name, io, list(batch_sizes))
        specs = {mode: tuple(TensorSpec(n, d, tuple(s)) for n, (m, d, s) in io.items() if m == mode)
                 for mode in ("INPUT", "OUTPUT")}
        engines[name] = EngineSpec(name, f"onnx/{name}.onnx", f"trt/{name}.plan", specs["INPUT"], specs["OUTPUT"],
                                   tuple(batch_sizes))
    return Bundle(root=root, family="sd15", precision="fp16", backend="tensorrt", guidance_mode="embedding",
                  height=16, width=16, batch_sizes=tuple(batch_sizes), latent_channels=4, vae_scale_factor=8,
                  vae_scaling_factor=0.18215, default_steps=4, default_guidance_scale=8.0,
                  scheduler=SchedulerConfig(), text=TextConfig(("tokenizer.json",), (0,), max_length=8),
                  engines=engines, build=device_info())

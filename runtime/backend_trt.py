"""TensorRT backend: plans deserialized once, device buffers with pinned host staging, one non-blocking stream,
one scratch allocation shared by every execution context, and CUDA graphs of whole launches.

Imported only by `open_backend` for TensorRT bundles, so tensorrt and cuda-python are imported at module level.
"""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any, Callable

import numpy as np
import tensorrt as trt
from cuda.bindings import runtime as cudart
from cuda.bindings.utils import get_cuda_native_handle

from lcmtrt.runtime.backend import Buffer
from lcmtrt.runtime.bundle import Bundle, EngineSpec
from lcmtrt.runtime.errors import UserError

log = logging.getLogger(__name__)

TENSOR_ALIGNMENT = 256  # setTensorAddress: "the pointer must have at least 256-byte alignment"
SCRATCH_ALIGNMENT = 512  # some TensorRT versions reject setDeviceMemory below 512-byte alignment
REBUILD = "please rebuild them with `lcmtrt build-engines`"
H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost


def _error_name(err: Any) -> str:
    return cudart.cudaGetErrorName(err)[1].decode()


def _cuda(fn: Callable[..., tuple[Any, ...]], *args: Any) -> Any:
    """Call a cudart function (which returns (error, *outputs)), raise on error, return its output(s) if any."""
    err, *out = fn(*args)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{fn.__name__} failed: {_error_name(err)}")
    return None if not out else out[0] if len(out) == 1 else tuple(out)


class CudaBuffer:
    """Device memory plus a pinned host mirror of the same layout; `row` views share both and the copy event."""

    def __init__(self, backend: TensorRTBackend, shape: tuple[int, ...], ptr: int, host: np.ndarray, event: Any):
        self.shape = shape
        self.dtype = host.dtype
        self.ptr = ptr
        self.nbytes = host.nbytes
        self._backend = backend
        self._host = host
        self._event = event  # recorded after each copy out of the staging memory this buffer shares

    def write(self, host: np.ndarray) -> None:
        if np.shape(host) != self.shape:
            raise ValueError(f"cannot write an array of shape {np.shape(host)} into a buffer of shape {self.shape}")
        self._backend.require_eager("Buffer.write")
        _cuda(cudart.cudaEventSynchronize, self._event)  # the previous upload from this staging must have happened
        np.copyto(self._host, host, casting="same_kind")
        stream = self._backend.stream
        _cuda(cudart.cudaMemcpyAsync, self.ptr, self._host.ctypes.data, self._host.nbytes, H2D, stream)
        _cuda(cudart.cudaEventRecord, self._event, stream)

    def read(self) -> np.ndarray:
        self._backend.require_eager("Buffer.read")
        _cuda(cudart.cudaMemcpyAsync, self._host.ctypes.data, self.ptr, self._host.nbytes, D2H, self._backend.stream)
        self._backend.synchronize()
        return self._host

    def row(self, index: int) -> CudaBuffer:
        if not self.shape or not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} of a buffer of shape {self.shape}")
        host = self._host[index : index + 1].reshape(self.shape[1:])  # a view, also for 1-D buffers
        return CudaBuffer(self._backend, self.shape[1:], self.ptr + index * host.nbytes, host, self._event)


class TrtBinding:
    """One execution context of one engine at one optimization profile, every I/O tensor bound to a CudaBuffer."""

    def __init__(self, backend: TensorRTBackend, name: str, profile: int, tensors: dict[str, Buffer]) -> None:
        engine = backend.engines[name]
        self.name = name
        self._backend = backend
        self._tensors = dict(tensors)  # keeps the buffers referenced while bound
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing, extra = [n for n in names if n not in tensors], [n for n in tensors if n not in names]
        if missing or extra:
            raise ValueError(f"engine {name}: unbound tensors {missing}, unknown tensors {extra}")
        for n, buf in tensors.items():
            if not isinstance(buf, CudaBuffer):
                raise TypeError(f"engine {name}: tensor {n} must be bound to a buffer from this backend's alloc()")
            want = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            if buf.dtype != want:
                raise ValueError(f"engine {name}: tensor {n} is {want}, its buffer is {buf.dtype}")
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        misaligned = [n for n, buf in tensors.items() if buf.ptr % TENSOR_ALIGNMENT]
        if misaligned:  # e.g. a row view of small rows: allocate such tensors as buffers of their own
            raise ValueError(f"engine {name}: tensors {misaligned} are not {TENSOR_ALIGNMENT}-byte aligned")
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"TensorRT cannot create a context for {name}: {backend.logger.recent_errors()}")
        ctx.set_device_memory(*backend.scratch)  # shared: contexts only ever run one after another on one stream
        ctx.set_optimization_profile_async(profile, backend.stream_handle)
        backend.synchronize()  # the profile switch is enqueued work
        for n in inputs:
            if not ctx.set_input_shape(n, tensors[n].shape):
                expected = tuple(engine.get_tensor_profile_shape(n, profile)[0])
                raise ValueError(f"engine {name}: input {n} has shape {tensors[n].shape}, profile expects {expected}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise ValueError(f"engine {name}: cannot infer shapes, unspecified inputs {list(unresolved)}")
        for n in names:
            got = tuple(ctx.get_tensor_shape(n))
            if got != tensors[n].shape:
                raise ValueError(f"engine {name}: tensor {n} has shape {got}, its buffer {tensors[n].shape}")
            if not ctx.set_tensor_address(n, tensors[n].ptr):
                raise ValueError(f"engine {name}: TensorRT refused the address of tensor {n}")
        self.context: Any = ctx

    def run(self) -> None:
        if self.context is None:
            raise RuntimeError(f"engine {self.name}: the backend is closed")
        self._backend.logger.errors.clear()  # so that a failure reports this run's errors only
        if not self.context.execute_async_v3(self._backend.stream_handle):
            raise RuntimeError(f"TensorRT failed to run {self.name}: {self._backend.logger.recent_errors()}")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle) -> None:
        # the TensorRT facts are shared with the build; imported here because runtime/ imports nothing from engines/
        # at module level (DESIGN.md)
        from lcmtrt.engines.tensorrt_build import check_compatibility, device_info, trt_logger

        self.bundle = bundle
        self.stream: Any = None
        self.capturing = False
        self.engines: dict[str, Any] = {}
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self._events: list[Any] = []
        self._graphs: list[tuple[Any, Any]] = []
        self._bindings: list[TrtBinding] = []

        host = device_info()
        check_compatibility(bundle.build, host, bundle.root)
        self.device = host["gpu_name"]
        self.logger = trt_logger()
        self.stream = _cuda(cudart.cudaStreamCreateWithFlags, cudart.cudaStreamNonBlocking)
        self.stream_handle = get_cuda_native_handle(self.stream)  # TensorRT takes the raw cudaStream_t as an int
        self._runtime = trt.Runtime(self.logger)
        self.engines = {name: self._load(spec) for name, spec in bundle.engines.items()}
        size = max([e.device_memory_size_v2 for e in self.engines.values()] + [SCRATCH_ALIGNMENT])
        base = self.malloc(size + SCRATCH_ALIGNMENT)
        self.scratch = (-(-base // SCRATCH_ALIGNMENT) * SCRATCH_ALIGNMENT, size)  # (aligned pointer, size)

    def _load(self, spec: EngineSpec) -> Any:
        path = self.bundle.path(spec.artifact)
        try:
            plan = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read TensorRT plan {path} ({e.strerror}); {REBUILD}") from None
        self.logger.errors.clear()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(f"TensorRT cannot load {path} ({self.logger.recent_errors()}); {REBUILD}")
        if engine.num_optimization_profiles != len(spec.batch_sizes):
            raise UserError(
                f"{path} has {engine.num_optimization_profiles} optimization profiles but the bundle lists batch "
                f"sizes {list(spec.batch_sizes)} for it; {REBUILD}"
            )
        return engine

    def malloc(self, nbytes: int) -> int:
        """Raw device memory, freed by close()."""
        ptr = _cuda(cudart.cudaMalloc, nbytes)
        self._device_ptrs.append(ptr)
        return ptr

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> CudaBuffer:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        count = math.prod(shape)
        nbytes = max(count * dtype.itemsize, 1)
        ptr = self.malloc(nbytes)
        host_ptr = _cuda(cudart.cudaMallocHost, nbytes)
        self._host_ptrs.append(host_ptr)
        event = _cuda(cudart.cudaEventCreateWithFlags, cudart.cudaEventDisableTiming)
        self._events.append(event)
        host = np.frombuffer((ctypes.c_byte * nbytes).from_address(host_ptr), dtype, count).reshape(shape)
        return CudaBuffer(self, shape, ptr, host, event)

    def bind(self, engine: str, batch: int, tensors: dict[str, Buffer]) -> TrtBinding:
        if engine not in self.engines:
            raise ValueError(f"unknown engine {engine!r}; the bundle has {sorted(self.engines)}")
        profiles = self.bundle.engines[engine].batch_sizes
        if batch not in profiles:
            raise ValueError(f"batch size {batch} was not built for {engine}; it has {list(profiles)}")
        binding = TrtBinding(self, engine, profiles.index(batch), tensors)
        self._bindings.append(binding)
        return binding

    def require_eager(self, what: str) -> None:
        if self.capturing:
            raise RuntimeError(f"{what} cannot be captured in a CUDA graph (host memory is not replayed)")

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """Run `launch` once eagerly (that work really happens), then capture it as one CUDA graph and return a
        function that replays it; where capture fails, return `launch` itself."""
        launch()
        self.synchronize()  # the first run applies profile switches and lazy setup, which must not be captured
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls stay legal
        (err,) = cudart.cudaStreamBeginCapture(self.stream, mode)
        if err != cudart.cudaError_t.cudaSuccess:
            return self._eager(launch, f"cudaStreamBeginCapture failed: {_error_name(err)}")
        self.capturing = True
        try:
            launch()
        except BaseException as e:
            self._destroy_graph(self._end_capture())
            if not isinstance(e, RuntimeError):  # a bug in `launch`, not a capture limitation
                raise
            return self._eager(launch, str(e))
        graph = self._end_capture()
        if graph is None:
            return self._eager(launch, "the capture was invalidated")
        err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        if err != cudart.cudaError_t.cudaSuccess:
            self._destroy_graph(graph)
            return self._eager(launch, f"cudaGraphInstantiate failed: {_error_name(err)}")
        self._graphs.append((graph_exec, graph))

        def replay() -> None:
            _cuda(cudart.cudaGraphLaunch, graph_exec, self.stream)

        return replay

    def _end_capture(self) -> Any:
        """Leave capture mode; the captured graph, or None when the capture was invalidated."""
        self.capturing = False
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        return graph if err == cudart.cudaError_t.cudaSuccess else None

    def _destroy_graph(self, graph: Any) -> None:
        if graph is not None:
            cudart.cudaGraphDestroy(graph)

    def _eager(self, launch: Callable[[], None], why: str) -> Callable[[], None]:
        cudart.cudaGetLastError()  # clear the capture error so that later CUDA calls do not report it
        log.warning("CUDA graph capture failed (%s); launching eagerly instead", why)
        return launch

    def synchronize(self) -> None:
        _cuda(cudart.cudaStreamSynchronize, self.stream)

    def timed(self, run: Callable[[], None]) -> float:
        """Device time of `run` between two CUDA events on the stream."""
        start, end = (_cuda(cudart.cudaEventCreate) for _ in range(2))
        try:
            _cuda(cudart.cudaEventRecord, start, self.stream)
            run()
            _cuda(cudart.cudaEventRecord, end, self.stream)
            _cuda(cudart.cudaEventSynchronize, end)
            return _cuda(cudart.cudaEventElapsedTime, start, end) / 1000.0
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)

    def refit(self, engine: str, weights: dict[str, np.ndarray]) -> None:
        """Replace named weights of a refittable plan in place (trt.Refitter); contexts stay valid, captured
        graphs do not (the pipeline captures again)."""
        self.synchronize()  # refitting an engine with enqueued work is undefined
        refitter = trt.Refitter(self.engines[engine], self.logger)
        self._refit_arrays = list(weights.values())  # TensorRT reads them during refit_cuda_engine
        for name, array in weights.items():
            if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(array))):
                raise UserError(f"TensorRT refused new weights for {name} in {engine}: {self.logger.recent_errors()}")
        if not refitter.refit_cuda_engine():
            raise UserError(f"TensorRT could not refit {engine}: {self.logger.recent_errors()}")

    def memory_in_use(self) -> int:
        """Device bytes in use on this GPU (all processes), for the benchmark's peak-memory figure."""
        free, total = _cuda(cudart.cudaMemGetInfo)
        return total - free

    def close(self) -> None:
        """Free every engine, context, graph and allocation; buffers and arrays from `read()` become invalid."""
        if self.stream is None:
            return
        cudart.cudaStreamSynchronize(self.stream)  # errors ignored: freeing goes on regardless
        for graph_exec, graph in self._graphs:
            cudart.cudaGraphExecDestroy(graph_exec)
            cudart.cudaGraphDestroy(graph)
        for binding in self._bindings:
            binding.context = None  # contexts go before their engines
        self._graphs, self._bindings, self.engines = [], [], {}
        for ptr in self._device_ptrs:
            cudart.cudaFree(ptr)
        for ptr in self._host_ptrs:
            cudart.cudaFreeHost(ptr)
        for event in self._events:
            cudart.cudaEventDestroy(event)
        self._device_ptrs, self._host_ptrs, self._events = [], [], []
        cudart.cudaStreamDestroy(self.stream)
        self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # best effort: at interpreter exit cudart may already be torn down
            pass

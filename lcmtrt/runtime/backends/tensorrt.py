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

try:  # cuda-python >= 12.9.1; int() on a handle works before it and is deprecated from 13.0
    from cuda.bindings.utils import get_cuda_native_handle
except ImportError:
    get_cuda_native_handle = int

from lcmtrt.runtime.backends.base import Buffer
from lcmtrt.bundle import Bundle, EngineSpec
from lcmtrt.errors import RefitError, UserError
from lcmtrt.runtime.backends.devices import tensorrt_device
from lcmtrt.runtime.backends.tensorrt_host import check_compatibility, device_info, trt_logger

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

    def __init__(self, backend: TensorRTBackend, shape: tuple[int, ...], ptr: int, host: np.ndarray, event: Any,
                 owner: bool = True):
        self.shape = shape
        self.dtype = host.dtype
        self.ptr = ptr
        self.nbytes = host.nbytes
        self._backend = backend
        self._host = host
        self._event = event  # recorded after each copy out of the staging memory this buffer shares
        self._owner = owner  # False for a row view: its parent frees the memory
        self.released = False

    def write(self, host: np.ndarray) -> None:
        if np.shape(host) != self.shape:
            raise ValueError(f"cannot write an array of shape {np.shape(host)} into a buffer of shape {self.shape}")
        self._require_alive()
        self._backend.require_eager("Buffer.write")
        _cuda(cudart.cudaEventSynchronize, self._event)  # the previous upload from this staging must have happened
        np.copyto(self._host, host, casting="same_kind")
        stream = self._backend.stream
        _cuda(cudart.cudaMemcpyAsync, self.ptr, self._host.ctypes.data, self._host.nbytes, H2D, stream)
        _cuda(cudart.cudaEventRecord, self._event, stream)

    def read(self) -> np.ndarray:
        self._require_alive()
        self._backend.require_eager("Buffer.read")
        _cuda(cudart.cudaMemcpyAsync, self._host.ctypes.data, self.ptr, self._host.nbytes, D2H, self._backend.stream)
        self._backend.synchronize()
        return self._host

    def row(self, index: int) -> CudaBuffer:
        if not self.shape or not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} of a buffer of shape {self.shape}")
        host = self._host[index : index + 1].reshape(self.shape[1:])  # a view, also for 1-D buffers
        return CudaBuffer(self._backend, self.shape[1:], self.ptr + index * host.nbytes, host, self._event,
                          owner=False)

    def _require_alive(self) -> None:
        if self.released:  # its pinned staging memory is freed: touching it could crash the process
            raise RuntimeError("this buffer was released")

    def release(self) -> None:
        """Free the device memory, the pinned staging memory and the copy event (a row view frees nothing)."""
        if self._owner and not self.released:
            self.released = True
            self._backend.free(self.ptr, self._host.ctypes.data, self._event)


class TrtBinding:
    """One execution context of one engine at one optimization profile, every I/O tensor bound to a CudaBuffer."""

    def __init__(self, backend: TensorRTBackend, name: str, engine: Any, profile: int,
                 tensors: dict[str, Buffer]) -> None:
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
        try:
            unresolved = ctx.infer_shapes()  # names still unspecified; other failures raise RuntimeError
        except RuntimeError as e:
            raise ValueError(f"engine {name}: TensorRT cannot infer its output shapes ({e}; "
                             f"{backend.logger.recent_errors()})") from None
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
            raise RuntimeError(f"engine {self.name}: the binding is released or the backend closed")
        self._backend.logger.errors.clear()  # so that a failure reports this run's errors only
        if not self.context.execute_async_v3(self._backend.stream_handle):
            raise RuntimeError(f"TensorRT failed to run {self.name}: {self._backend.logger.recent_errors()}")

    def release(self) -> None:
        """Destroy the execution context (TensorRT frees it with its last reference) and forget the buffers."""
        if self.context is not None:
            self._backend.synchronize()  # the context's queued work must be done before it goes
            self.context = None
        self._tensors = {}
        self._backend.forget(self)


class CapturedLaunch:
    """A launch that becomes one CUDA graph: the first call runs it eagerly (doing that request's work, and the
    profile switches and lazy setup that must not be captured), then captures it without running it; later calls
    replay the graph. `reset()` drops the graph (after a refit) so that the next call captures again."""

    def __init__(self, backend: TensorRTBackend, launch: Callable[[], None]) -> None:
        self._backend, self._launch = backend, launch
        self._graph: tuple[Any, Any] | None = None  # (graph exec, graph)
        self.eager_only = False  # capture failed once: always launch eagerly

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self) -> None:
        if self._graph is not None:
            _cuda(cudart.cudaGraphLaunch, self._graph[0], self._backend.stream)
            return
        self._launch()
        if not self.eager_only:
            self._backend.synchronize()  # the eager run's setup work must finish before capture begins
            self._graph = self._capture()
            self.eager_only = self._graph is None

    def _capture(self) -> tuple[Any, Any] | None:
        backend = self._backend
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls stay legal
        (err,) = cudart.cudaStreamBeginCapture(backend.stream, mode)
        if err != cudart.cudaError_t.cudaSuccess:
            return _capture_failed(f"cudaStreamBeginCapture failed: {_error_name(err)}")
        backend.capturing = True
        try:
            self._launch()
        except BaseException as e:
            _destroy_graph(self._end_capture())
            if not isinstance(e, RuntimeError):  # a bug in `launch`, not a capture limitation
                raise
            return _capture_failed(str(e))
        graph = self._end_capture()
        if graph is None:
            return _capture_failed("the capture was invalidated")
        err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        if err != cudart.cudaError_t.cudaSuccess:
            _destroy_graph(graph)
            return _capture_failed(f"cudaGraphInstantiate failed: {_error_name(err)}")
        return graph_exec, graph

    def _end_capture(self) -> Any:
        """Leave capture mode; the captured graph, or None when the capture was invalidated."""
        self._backend.capturing = False
        err, graph = cudart.cudaStreamEndCapture(self._backend.stream)
        return graph if err == cudart.cudaError_t.cudaSuccess else None

    def reset(self) -> None:
        if self._graph is not None:
            cudart.cudaGraphExecDestroy(self._graph[0])
            cudart.cudaGraphDestroy(self._graph[1])
            self._graph = None

    def release(self) -> None:
        """Destroy the graph exec and graph for good: the launch must not be called after."""
        self.reset()
        self.eager_only = True  # a stray call can no longer capture a new graph
        self._backend.forget(self)


def _destroy_graph(graph: Any) -> None:
    if graph is not None:
        cudart.cudaGraphDestroy(graph)


def _capture_failed(why: str) -> None:
    cudart.cudaGetLastError()  # clear the capture error so that later CUDA calls do not report it
    log.warning("CUDA graph capture failed (%s); launching eagerly instead", why)
    return None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        tensorrt_device(device)  # the first visible CUDA GPU: anything else is refused before CUDA is touched
        self.bundle = bundle
        self.stream: Any = None
        self.capturing = False
        self.plans: dict[str, list[Any]] = {}  # engine name -> its deserialized plans (one per batch when split)
        self._device_ptrs: set[int] = set()
        self._host_ptrs: set[int] = set()
        self._events: list[Any] = []
        self._captures: list[CapturedLaunch] = []
        self._bindings: list[TrtBinding] = []

        host = device_info()
        check_compatibility(bundle.build, host, bundle.root)
        self.device = host["gpu_name"]
        self.logger = trt_logger()
        self.stream = _cuda(cudart.cudaStreamCreateWithFlags, cudart.cudaStreamNonBlocking)
        self.stream_handle = get_cuda_native_handle(self.stream)  # TensorRT takes the raw cudaStream_t as an int
        self._runtime = trt.Runtime(self.logger)
        self.plans = {name: self._load(spec) for name, spec in bundle.engines.items()}
        sizes = [e.device_memory_size_v2 for plans in self.plans.values() for e in plans]
        size = max(sizes + [SCRATCH_ALIGNMENT])
        base = self.malloc(size + SCRATCH_ALIGNMENT)
        self.scratch = (-(-base // SCRATCH_ALIGNMENT) * SCRATCH_ALIGNMENT, size)  # (aligned pointer, size)

    def _load(self, spec: EngineSpec) -> list[Any]:
        """The engine's plans: one with a profile per batch size, or one per batch size with one profile each."""
        split = bool(spec.plans)
        if split and len(spec.plans) != len(spec.batch_sizes):
            raise UserError(f"bundle {self.bundle.root} lists {len(spec.plans)} plans for {spec.name} at batch "
                            f"sizes {list(spec.batch_sizes)}; {REBUILD}")
        plans = []
        for artifact in spec.plans or (spec.artifact,):
            path = self.bundle.path(artifact)
            try:
                plan = path.read_bytes()
            except OSError as e:
                raise UserError(f"cannot read TensorRT plan {path} ({e.strerror}); {REBUILD}") from None
            self.logger.errors.clear()
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise UserError(f"TensorRT cannot load {path} ({self.logger.recent_errors()}); {REBUILD}")
            expected = 1 if split else len(spec.batch_sizes)
            if engine.num_optimization_profiles != expected:
                raise UserError(f"{path} has {engine.num_optimization_profiles} optimization profiles but the bundle "
                                f"expects {expected} for batch sizes {list(spec.batch_sizes)}; {REBUILD}")
            plans.append(engine)
        return plans

    def malloc(self, nbytes: int) -> int:
        """Raw device memory, freed by close()."""
        ptr = _cuda(cudart.cudaMalloc, nbytes)
        self._device_ptrs.add(ptr)
        return ptr

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> CudaBuffer:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        count = math.prod(shape)
        nbytes = max(count * dtype.itemsize, 1)
        ptr = self.malloc(nbytes)
        host_ptr = _cuda(cudart.cudaMallocHost, nbytes)
        self._host_ptrs.add(host_ptr)
        event = _cuda(cudart.cudaEventCreateWithFlags, cudart.cudaEventDisableTiming)
        self._events.append(event)
        host = np.frombuffer((ctypes.c_byte * nbytes).from_address(host_ptr), dtype, count).reshape(shape)
        return CudaBuffer(self, shape, ptr, host, event)

    def free(self, ptr: int, host_ptr: int, event: Any) -> None:
        """Free one buffer's device and pinned memory and its event now (CudaBuffer.release), after the stream's
        work; close() frees what is left."""
        if self.stream is None or ptr not in self._device_ptrs:
            return  # closed already, or freed
        self.synchronize()
        _cuda(cudart.cudaFree, ptr)
        self._device_ptrs.discard(ptr)
        if host_ptr in self._host_ptrs:
            _cuda(cudart.cudaFreeHost, host_ptr)
            self._host_ptrs.discard(host_ptr)
        if any(e is event for e in self._events):
            _cuda(cudart.cudaEventDestroy, event)
            self._events = [e for e in self._events if e is not event]

    def forget(self, resource: TrtBinding | CapturedLaunch) -> None:
        """A released binding or captured launch: close() and refit() no longer see it."""
        self._bindings = [b for b in self._bindings if b is not resource]
        self._captures = [c for c in self._captures if c is not resource]

    def bind(self, engine: str, batch: int, tensors: dict[str, Buffer]) -> TrtBinding:
        if engine not in self.plans:
            raise ValueError(f"unknown engine {engine!r}; the bundle has {sorted(self.plans)}")
        spec = self.bundle.engines[engine]
        if batch not in spec.batch_sizes:
            raise ValueError(f"batch size {batch} was not built for {engine}; it has {list(spec.batch_sizes)}")
        index = spec.batch_sizes.index(batch)
        plan, profile = (self.plans[engine][index], 0) if spec.plans else (self.plans[engine][0], index)
        binding = TrtBinding(self, engine, plan, profile, tensors)
        self._bindings.append(binding)
        return binding

    def require_eager(self, what: str) -> None:
        if self.capturing:
            raise RuntimeError(f"{what} cannot be captured in a CUDA graph (host memory is not replayed)")

    def capture(self, launch: Callable[[], None]) -> CapturedLaunch:
        """`launch` as one CUDA graph: its first call runs eagerly and captures, later calls replay (CapturedLaunch);
        where capture fails it keeps launching eagerly."""
        captured = CapturedLaunch(self, launch)
        self._captures.append(captured)
        return captured

    @property
    def graph_count(self) -> int:
        """CUDA graphs alive: one per captured launch."""
        return sum(c.captured for c in self._captures)

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

    def refit(self, weights: dict[str, dict[str, np.ndarray]]) -> None:
        """Replace named weights ({engine: {name: array}}) in every plan of those engines, in place (trt.Refitter).
        Buffers, contexts and bindings stay valid; captured graphs are dropped and captured again on their next call.
        All weights are set and checked for completeness before the first engine changes; a refit that fails after
        that raises RefitError(changed=True). The arrays are only referenced until this returns."""
        self.synchronize()  # refitting an engine with enqueued work is undefined
        refitters = []
        for engine, named in weights.items():
            if engine not in self.plans:
                raise RefitError(f"the bundle has no engine {engine!r} to refit", changed=False)
            for plan in self.plans[engine]:
                refitter = trt.Refitter(plan, self.logger)
                for name, array in named.items():
                    if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(array))):
                        raise RefitError(f"TensorRT refused new weights for {name} in {engine}: "
                                         f"{self.logger.recent_errors()}", changed=False)
                missing = list(refitter.get_missing_weights())
                if missing:  # refit_cuda_engine would fail after refitting a subset
                    raise RefitError(f"refitting {engine} also needs weights {missing[:8]}"
                                     f"{' ...' if len(missing) > 8 else ''}; rebuild the bundle with --refittable",
                                     changed=False)
                refitters.append((engine, refitter))
        for captured in self._captures:  # whether a graph outlives a refit is not documented: capture again
            captured.reset()
        for engine, refitter in refitters:
            self.logger.errors.clear()
            if not refitter.refit_cuda_engine():
                raise RefitError(f"TensorRT could not refit {engine} ({self.logger.recent_errors()}); its weights "
                                 "are now partly replaced", changed=True)
        refitters.clear()  # the refitters reference the arrays: nothing keeps them past this call

    def memory_in_use(self) -> int:
        """Device bytes in use on this GPU (all processes), for the benchmark's peak-memory figure."""
        free, total = _cuda(cudart.cudaMemGetInfo)
        return total - free

    def close(self) -> None:
        """Free every engine, context, graph and allocation; buffers and arrays from `read()` become invalid."""
        if self.stream is None:
            return
        cudart.cudaStreamSynchronize(self.stream)  # errors ignored: freeing goes on regardless
        for captured in self._captures:
            captured.reset()
        for binding in self._bindings:
            binding.context = None  # contexts go before their engines
        self._captures, self._bindings, self.plans = [], [], {}
        for ptr in self._device_ptrs:
            cudart.cudaFree(ptr)
        for ptr in self._host_ptrs:
            cudart.cudaFreeHost(ptr)
        for event in self._events:
            cudart.cudaEventDestroy(event)
        self._device_ptrs, self._host_ptrs, self._events = set(), set(), []
        cudart.cudaStreamDestroy(self.stream)
        self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # best effort: at interpreter exit cudart may already be torn down
            pass

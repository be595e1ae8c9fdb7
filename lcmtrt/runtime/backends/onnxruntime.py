"""ONNX Runtime backend: one session per engine; buffers bound by address through IOBinding, so a run neither
allocates outputs nor copies inputs (host memory on the CPU provider, device memory on the CUDA provider)."""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from lcmtrt.bundle import Bundle
from lcmtrt.errors import RefitError, UserError
from lcmtrt.runtime.backends.devices import onnxruntime_device

log = logging.getLogger(__name__)
NO_SPINNING = "session.intra_op.allow_spinning"
DEAD_GRAPHS_KEPT = 64  # released CUDA graphs an engine's session may hold before it is replaced


class OrtBuffer:
    """A buffer with a fixed address: a numpy array on the CPU, an OrtValue (or a view into one) on CUDA."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, device: str, array: np.ndarray | None = None,
                 value: ort.OrtValue | None = None, ptr: int | None = None):
        self.shape, self.dtype, self.device = tuple(shape), np.dtype(dtype), device
        self.array, self.value = array, value
        self.ptr = ptr if ptr is not None else (array.ctypes.data if array is not None else value.data_ptr())

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: np.dtype, device: str) -> OrtBuffer:
        if device == "cpu":
            return cls(shape, dtype, device, array=np.zeros(shape, dtype))
        return cls(shape, dtype, device, value=ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def write(self, host: np.ndarray) -> None:
        if host.shape != self.shape or host.dtype != self.dtype:
            raise ValueError(f"buffer is {self.dtype}{list(self.shape)}, got {host.dtype}{list(host.shape)}")
        if self.array is not None:
            np.copyto(self.array, host)
        elif self.value is not None:
            self.value.update_inplace(np.ascontiguousarray(host))
        else:
            raise TypeError("a row view of a CUDA buffer is bound, not written: write its parent buffer")

    def read(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        if self.value is None:
            raise TypeError("a row view of a CUDA buffer is bound, not read: read its parent buffer")
        return self.value.numpy()

    def release(self) -> None:
        """Drop the array or OrtValue: its memory goes with the last reference (released bindings hold none)."""
        self.array, self.value = None, None

    def row(self, index: int) -> OrtBuffer:
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} of a buffer with {self.shape[0]} rows")
        if self.array is not None:
            return OrtBuffer(self.shape[1:], self.dtype, self.device, array=self.array[index])
        row_bytes = self.nbytes // self.shape[0]
        return OrtBuffer(self.shape[1:], self.dtype, self.device, ptr=self.ptr + index * row_bytes)


class OrtBinding:
    """One engine's tensors bound by address. The addresses are kept so that a weight swap, which replaces the
    session, binds the same buffers to the new one (`bind_to`) instead of allocating new ones."""

    def __init__(self, session: ort.InferenceSession, tensors: list[tuple[str, bool, OrtBuffer]], device_type: str,
                 graph_id: int | None = None, on_release: Callable[[OrtBinding], None] | None = None):
        self.tensors, self.device_type, self.on_release = tensors, device_type, on_release
        self.run_options: ort.RunOptions | None = None
        self.graph_id = graph_id
        if graph_id is not None:
            self.use_graph(graph_id)
        self.bind_to(session)

    def use_graph(self, graph_id: int) -> None:
        """enable_cuda_graph: each address set is its own captured graph, named by its id in the run options."""
        self.graph_id = graph_id
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def bind_to(self, session: ort.InferenceSession) -> None:
        if self.tensors is None:  # released: a weight swap has nothing to bind
            return
        io = session.io_binding()
        for name, is_input, buffer in self.tensors:
            bind = io.bind_input if is_input else io.bind_output
            bind(name, self.device_type, 0, buffer.dtype, list(buffer.shape), buffer.ptr)
        self.session, self.io = session, io

    def run(self) -> None:
        # RunOptions only with CUDA graphs: reading an unset config entry raises and catches an exception per call
        if self.run_options is None:
            self.session.run_with_iobinding(self.io)
        else:
            self.session.run_with_iobinding(self.io, self.run_options)

    def release(self) -> None:
        """Unbind every buffer and drop the session and buffers. A CUDA graph ONNX Runtime captured for this
        binding's graph id stays inside the session (it has no call that frees one graph): the backend counts it,
        and replaces the session once such dead graphs outnumber the live ones (OnnxRuntimeBackend._reclaim)."""
        if self.tensors is None:
            return
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self.tensors, self.io, self.session = None, None, None
        if self.on_release is not None:
            self.on_release(self)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None, cuda_graph: bool = True):
        self.provider_device = onnxruntime_device(device, bundle.build.get("ort_device", "cpu"),
                                                  "CUDAExecutionProvider" in ort.get_available_providers())
        self.bundle = bundle
        providers = ["CPUExecutionProvider"]
        if self.provider_device == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Every engine has its own intra-op pool: a finished session's threads spinning for work would take the
        # cores the next engine's threads need (a third of a small generation on 2 cores), so they sleep instead.
        options.add_session_config_entry(NO_SPINNING, "0")
        if threads:
            options.intra_op_num_threads = threads
        self.options, self.providers = options, providers
        # engines whose session replays CUDA graphs (provider option enable_cuda_graph; refused by ONNX Runtime for
        # graphs with nodes off the CUDA provider, which then run without)
        self.cuda_graph_engines: set[str] = set()
        self._cuda_graph = cuda_graph and self.provider_device == "cuda"
        self.sessions = {name: self._session(name, cuda_graph=self._cuda_graph) for name in bundle.engines}
        self._overrides: dict[str, list] = {}  # replaced weights stay alive as long as their session
        self._bindings: dict[str, weakref.WeakSet[OrtBinding]] = {name: weakref.WeakSet() for name in bundle.engines}
        self._graph_ids = 0
        self._dead_graphs: dict[str, int] = {name: 0 for name in bundle.engines}  # released graph ids, per engine
        self._options: dict[str, ort.SessionOptions] = {}  # a refitted engine's options (its replaced weights)
        self.device = "CUDA (onnxruntime)" if self.provider_device == "cuda" else "CPU (onnxruntime)"

    def _session(self, name: str, options: ort.SessionOptions | None = None,
                 cuda_graph: bool = False) -> ort.InferenceSession:
        if cuda_graph:
            graphed = [("CUDAExecutionProvider", {**self.providers[0][1], "enable_cuda_graph": "1"}),
                       *self.providers[1:]]
            try:
                session = ort.InferenceSession(str(self._engine_path(name)), options or self.options,
                                               providers=graphed)
            except Exception as e:  # noqa: BLE001 - e.g. "all compute graph nodes have not been partitioned to the CUDA EP"
                log.info("engine %s runs without CUDA graphs: %s", name, str(e).splitlines()[0])
            else:
                self.cuda_graph_engines.add(name)
                return self._check_provider(session)
        self.cuda_graph_engines.discard(name)
        try:
            session = ort.InferenceSession(str(self._engine_path(name)), options or self.options,
                                           providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises several private exception types
            raise UserError(f"ONNX Runtime cannot load engine {name} from {self.bundle.root}: "
                            f"{str(e).splitlines()[0]}; rebuild the bundle") from None
        return self._check_provider(session)

    def _engine_path(self, name: str) -> Path:
        return self.bundle.path(self.bundle.engines[name].artifact)

    def _check_provider(self, session: ort.InferenceSession) -> ort.InferenceSession:
        if self.provider_device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError("ONNX Runtime's CUDA provider does not run on this host (no usable GPU or CUDA "
                            "libraries); use --device cpu")
        return session

    def refit(self, weights: dict[str, dict[str, np.ndarray]]) -> None:
        """For each engine, a new session with `weights` replacing its external initializers before any graph
        optimization (so nothing is folded from the file's values). Existing bindings are bound to the new session
        with the same buffers, and the old session and its weights are released: a swap allocates no lasting
        memory. An engine that fails after an earlier one was swapped raises RefitError(changed=True)."""
        for done, (engine, named) in enumerate(weights.items()):
            options = ort.SessionOptions()
            options.graph_optimization_level = self.options.graph_optimization_level
            options.log_severity_level = self.options.log_severity_level
            options.intra_op_num_threads = self.options.intra_op_num_threads
            options.add_session_config_entry(NO_SPINNING, "0")
            arrays = [np.ascontiguousarray(a) for a in named.values()]
            options.add_external_initializers(list(named), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
            try:
                # graphs stay as they were: bindings made for a graphed session carry their own graph ids
                session = self._session(engine, options, cuda_graph=engine in self.cuda_graph_engines)
            except UserError as e:
                raise RefitError(str(e), changed=done > 0) from None
            for binding in list(self._bindings[engine]):
                binding.bind_to(session)
            self.sessions[engine] = session
            self._overrides[engine] = arrays  # the session reads these OrtValues' memory: alive as long as it
            self._options[engine] = options

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> OrtBuffer:
        return OrtBuffer.allocate(tuple(shape), np.dtype(dtype), self.provider_device)

    def bind(self, engine: str, batch: int, tensors: dict[str, OrtBuffer]) -> OrtBinding:
        spec = self.bundle.engines[engine]
        expected = {t.name: t for t in spec.inputs + spec.outputs}
        if set(tensors) != set(expected):
            raise ValueError(f"engine {engine} takes {sorted(expected)}, bound {sorted(tensors)}")
        device_type = "cuda" if self.provider_device == "cuda" else "cpu"
        inputs = {t.name for t in spec.inputs}
        bound = []
        for name, buffer in tensors.items():
            want = expected[name]
            if buffer.shape != want.concrete(batch) or buffer.dtype != np.dtype(want.dtype):
                raise ValueError(f"{engine}.{name} needs {want.dtype}{list(want.concrete(batch))}, "
                                 f"bound {buffer.dtype}{list(buffer.shape)}")
            bound.append((name, name in inputs, buffer))
        graph_id = None
        if engine in self.cuda_graph_engines:
            self._reclaim(engine)
            self._graph_ids += 1  # 0 is ONNX Runtime's default graph: start at 1
            graph_id = self._graph_ids
        binding = OrtBinding(self.sessions[engine], bound, device_type, graph_id, self._released)
        self._bindings[engine].add(binding)
        return binding

    def _released(self, binding: OrtBinding) -> None:
        if binding.graph_id is not None:
            for engine, live in self._bindings.items():
                if binding in live:
                    self._dead_graphs[engine] += 1

    def _reclaim(self, engine: str) -> None:
        """Once released bindings' CUDA graphs outnumber the live ones (and DEAD_GRAPHS_KEPT), replace the engine's
        session: the old one goes with every graph it captured, and the live bindings are bound to the new one under
        new ids (each captures again on its next run). Graphs held stay within twice the live bindings."""
        live = [b for b in self._bindings[engine] if b.tensors is not None]
        if self._dead_graphs[engine] < max(DEAD_GRAPHS_KEPT, len(live)):
            return
        session = self._session(engine, self._options.get(engine), cuda_graph=True)
        for binding in live:
            self._graph_ids += 1
            binding.use_graph(self._graph_ids)
            binding.bind_to(session)
        self.sessions[engine] = session
        self._dead_graphs[engine] = 0
        log.info("engine %s: a new ONNX Runtime session frees the CUDA graphs of released step programs", engine)

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        return launch  # ONNX Runtime records CUDA graphs inside its own sessions, not across them

    def synchronize(self) -> None:
        """ONNX Runtime returns from run_with_iobinding once the work is done."""

    def timed(self, run: Callable[[], None]) -> float:
        start = time.perf_counter()  # run_with_iobinding returns when the work is done, on either provider
        run()
        return time.perf_counter() - start

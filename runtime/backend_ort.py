"""ONNX Runtime backend: one session per engine; buffers bound by address through IOBinding, so a run neither
allocates outputs nor copies inputs (host memory on the CPU provider, device memory on the CUDA provider)."""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

from lcmtrt.runtime.bundle import Bundle
from lcmtrt.runtime.errors import UserError

log = logging.getLogger(__name__)
NO_SPINNING = "session.intra_op.allow_spinning"


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

    def row(self, index: int) -> OrtBuffer:
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"row {index} of a buffer with {self.shape[0]} rows")
        if self.array is not None:
            return OrtBuffer(self.shape[1:], self.dtype, self.device, array=self.array[index])
        row_bytes = self.nbytes // self.shape[0]
        return OrtBuffer(self.shape[1:], self.dtype, self.device, ptr=self.ptr + index * row_bytes)


class OrtBinding:
    def __init__(self, session: ort.InferenceSession, io: ort.IOBinding):
        self.session, self.io = session, io

    def run(self) -> None:
        # No RunOptions: reading an unset config entry from them raises and catches an exception on every call.
        self.session.run_with_iobinding(self.io)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None):
        built_for = bundle.build.get("ort_device", "cpu")
        self.provider_device = built_for if device == "auto" else device
        if self.provider_device not in ("cpu", "cuda"):
            raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")
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
        self.sessions = {name: self._session(name) for name in bundle.engines}
        self._overrides: dict[str, list] = {}  # replaced weights stay alive as long as their session
        self.device = "CUDA (onnxruntime)" if self.provider_device == "cuda" else "CPU (onnxruntime)"

    def _session(self, name: str, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
        path = self.bundle.path(self.bundle.engines[name].artifact)
        try:
            session = ort.InferenceSession(str(path), options or self.options, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises several private exception types
            raise UserError(f"ONNX Runtime cannot load engine {name} from {self.bundle.root}: "
                            f"{str(e).splitlines()[0]}; rebuild the bundle") from None
        if self.provider_device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError("this bundle was built for ONNX Runtime's CUDA provider, which does not run on this "
                            "host; use --device cpu or rebuild the bundle here")
        return session

    def refit(self, engine: str, weights: dict[str, np.ndarray]) -> None:
        """A new session for `engine` with `weights` replacing its external initializers before any graph
        optimization (so nothing is folded from the file's values); bindings must be made again."""
        options = ort.SessionOptions()
        options.graph_optimization_level = self.options.graph_optimization_level
        options.log_severity_level = self.options.log_severity_level
        options.intra_op_num_threads = self.options.intra_op_num_threads
        options.add_session_config_entry(NO_SPINNING, "0")
        arrays = [np.ascontiguousarray(a) for a in weights.values()]
        options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        self.sessions[engine] = self._session(engine, options)
        self._overrides[engine] = arrays

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype | str) -> OrtBuffer:
        return OrtBuffer.allocate(tuple(shape), np.dtype(dtype), self.provider_device)

    def bind(self, engine: str, batch: int, tensors: dict[str, OrtBuffer]) -> OrtBinding:
        spec = self.bundle.engines[engine]
        expected = {t.name: t for t in spec.inputs + spec.outputs}
        if set(tensors) != set(expected):
            raise ValueError(f"engine {engine} takes {sorted(expected)}, bound {sorted(tensors)}")
        session = self.sessions[engine]
        io = session.io_binding()
        device_type = "cuda" if self.provider_device == "cuda" else "cpu"
        inputs = {t.name for t in spec.inputs}
        for name, buffer in tensors.items():
            want = expected[name]
            if buffer.shape != want.concrete(batch) or buffer.dtype != np.dtype(want.dtype):
                raise ValueError(f"{engine}.{name} needs {want.dtype}{list(want.concrete(batch))}, "
                                 f"bound {buffer.dtype}{list(buffer.shape)}")
            bind = io.bind_input if name in inputs else io.bind_output
            bind(name, device_type, 0, buffer.dtype, list(buffer.shape), buffer.ptr)
        return OrtBinding(session, io)

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        return launch  # ONNX Runtime records CUDA graphs inside its own sessions, not across them

    def synchronize(self) -> None:
        """ONNX Runtime returns from run_with_iobinding once the work is done."""

    def timed(self, run: Callable[[], None]) -> float:
        start = time.perf_counter()  # run_with_iobinding returns when the work is done, on either provider
        run()
        return time.perf_counter() - start

"""The backends, opened by name: each module imports its own libraries, so only the chosen one is imported."""

from __future__ import annotations

from lcmtrt.bundle import Bundle
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.base import Backend, Binding, Buffer, HostBuffer

__all__ = ["BACKENDS", "Backend", "Binding", "Buffer", "HostBuffer", "open_backend"]

BACKENDS = ("onnxruntime", "tensorrt", "openvino")


def open_backend(bundle: Bundle, device: str = "auto") -> Backend:
    """The backend the bundle was built for; `device` picks ONNX Runtime's provider (auto | cpu | cuda) or
    OpenVINO's device (auto | CPU | GPU | NPU ...)."""
    if bundle.backend == "tensorrt":
        from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle)
    if bundle.backend == "onnxruntime":
        from lcmtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device)
    if bundle.backend == "openvino":
        try:
            from lcmtrt.runtime.backends.openvino import OpenVinoBackend
        except ImportError:
            raise UserError(f"bundle {bundle.root} was built for OpenVINO, which is not installed here: "
                            "pip install 'lcmtrt[openvino]'") from None
        return OpenVinoBackend(bundle, device)
    raise UserError(f"bundle {bundle.root} names unknown backend {bundle.backend!r}; rebuild it")

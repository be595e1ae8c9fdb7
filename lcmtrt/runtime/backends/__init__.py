"""The backends, opened by name: each module imports its own libraries, so only the chosen one is imported."""

from __future__ import annotations

from typing import Any

from lcmtrt.bundle import Bundle
from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.base import Backend, Binding, Buffer, HostBuffer
from lcmtrt.runtime.backends.devices import DEVICE_HELP, onnxruntime_device, openvino_device, parse_device, tensorrt_device

__all__ = ["BACKENDS", "DEVICE_HELP", "Backend", "Binding", "Buffer", "HostBuffer", "batch_invariance",
           "open_backend", "parse_device", "resolve_device"]

BACKENDS = ("onnxruntime", "tensorrt", "openvino")
# (backend, device, precision) on which tests/test_batch_invariance.py checks that a row alone and the same row in
# a batch give the same bits. Elsewhere the graphs are the same but nobody has checked: TensorRT and ONNX Runtime's
# CUDA provider may pick other kernels per batch size, and reduced precision runs other kernels.
BATCH_INVARIANCE_VERIFIED = {("onnxruntime", "cpu", "fp32"), ("openvino", "CPU", "fp32")}


def batch_invariance(build: dict[str, Any], backend: str, device: str, precision: str) -> str:
    """Whether a row's result is independent of the batch it runs in, for a bundle with this build section run by
    `backend` on `device` (resolve_device's name) in `precision`: "verified" (BATCH_INVARIANCE_VERIFIED),
    "unverified", or "absent" when its graphs were exported before the Sin/Cos rewrite (export/batch_invariance.py;
    recorded as `batch_invariant_graphs`, by older bundles as `batch_invariant: true`)."""
    if build.get("batch_invariant_graphs") is not True and build.get("batch_invariant") is not True:
        return "absent"
    return "verified" if (backend, device, precision) in BATCH_INVARIANCE_VERIFIED else "unverified"


def _openvino_missing(bundle: Bundle) -> UserError:
    return UserError(f"bundle {bundle.root} was built for OpenVINO, which is not installed here: "
                     "pip install 'lcmtrt[openvino]'")


def resolve_device(bundle: Bundle, device: str = "auto") -> str:
    """The bundle's backend's name for `device` (runtime/backends/devices.py's vocabulary, any case): "cuda" for TensorRT,
    "cpu" or "cuda" for ONNX Runtime, an OpenVINO device name; refuses a device the backend cannot use in one line
    naming the ones it can. Cheap: only asks the backend's library which devices it has."""
    if bundle.backend == "tensorrt":
        return tensorrt_device(device)
    if bundle.backend == "onnxruntime":
        import onnxruntime as ort

        return onnxruntime_device(device, bundle.build.get("ort_device", "cpu"),
                                  "CUDAExecutionProvider" in ort.get_available_providers())
    if bundle.backend == "openvino":
        try:
            import openvino as ov
        except ImportError:
            raise _openvino_missing(bundle) from None
        return openvino_device(device, bundle.build.get("ov_device", "CPU"), ov.Core().available_devices)
    raise UserError(f"bundle {bundle.root} names unknown backend {bundle.backend!r}; rebuild it")


def open_backend(bundle: Bundle, device: str = "auto") -> Backend:
    """The backend the bundle was built for, on `device` (see resolve_device); a device the backend cannot use is
    refused before any engine loads."""
    device = resolve_device(bundle, device)
    if bundle.backend == "tensorrt":
        from lcmtrt.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, device)
    if bundle.backend == "onnxruntime":
        from lcmtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device)
    try:
        from lcmtrt.runtime.backends.openvino import OpenVinoBackend
    except ImportError:
        raise _openvino_missing(bundle) from None
    return OpenVinoBackend(bundle, device)

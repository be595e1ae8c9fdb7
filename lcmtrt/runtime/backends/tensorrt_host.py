"""The TensorRT host facts a plan is tied to (version, GPU, compute capability), the check that refuses plans
built elsewhere, and the process-wide TensorRT logger: used by the backend at load time and by the build.

`tensorrt` and `cuda.bindings` are imported inside functions so that this module imports on hosts without them.
"""

from __future__ import annotations

import collections
import functools
import logging
from pathlib import Path
from typing import Any

from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

REBUILD = "rebuild them with `lcmtrt build-engines`"

def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None when tensorrt and cuda-python import and a CUDA device is visible),
    with the CUDA error's name: cudaErrorInsufficientDriver means the driver is older than cuda-python's CUDA."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except Exception as e:  # noqa: BLE001 - a missing module or a missing driver library both mean "not here"
        return f"tensorrt and cuda-python do not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            name = cudart.cudaGetErrorName(err)[1].decode()
            hint = (" (the NVIDIA driver is older than the CUDA version of this cuda-python: install the "
                    "cuda-python and tensorrt wheels of your driver's CUDA major, e.g. lcmtrt[tensorrt] for CUDA 12)"
                    if name == "cudaErrorInsufficientDriver" else "")
            return f"cudaGetDeviceCount failed: {name}{hint}"
        return None if count >= 1 else "no CUDA device is visible"
    except Exception as e:  # noqa: BLE001 - broken driver libraries: report, never raise
        return f"CUDA is unusable ({type(e).__name__}: {e})"


def tensorrt_available() -> bool:
    """True when tensorrt and cuda-python import and at least one CUDA device is visible; never raises."""
    return tensorrt_unavailable_reason() is None


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA encodes 12.4 as 12040


def device_info() -> dict[str, Any]:
    """What a plan is tied to, for device 0: recorded into bundle.build at build time, compared at load time."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    def call(fn: Any, *args: Any) -> Any:
        err, value = fn(*args)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{fn.__name__} failed: {cudart.cudaGetErrorName(err)[1].decode()}")
        return value

    props = call(cudart.cudaGetDeviceProperties, 0)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": props.name.decode(errors="replace").rstrip("\x00"),
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.totalGlobalMem),
        "cuda_runtime_version": _cuda_version(call(cudart.cudaRuntimeGetVersion)),
        "cuda_driver_version": _cuda_version(call(cudart.cudaDriverGetVersion)),
    }


COMPATIBILITY_KEYS = {"tensorrt_version": "TensorRT version", "compute_capability": "compute capability",
                      "gpu_name": "GPU"}  # a plan is tied to all three (NVIDIA: the exact GPU model)


def check_compatibility(build: dict[str, Any], host: dict[str, Any], root: str | Path | None = None) -> None:
    """Refuse plans built by another TensorRT version, for another compute capability or on another GPU model,
    naming what differs."""
    differs = [f"{label} {build.get(k, 'unknown')} vs {host.get(k)} here" for k, label in COMPATIBILITY_KEYS.items()
               if build.get(k) is None or str(build[k]) != str(host.get(k))]
    if not differs:
        return
    where = f"engines in {root}" if root is not None else "these engines"
    raise UserError(f"{where} were built for another setup ({'; '.join(differs)}): {REBUILD}")


@functools.cache
def trt_logger() -> Any:
    """The process-wide TensorRT logger (TensorRT keeps the first one it is given): routes to `logging`, keeps
    the recent errors so that failures can say why."""
    import tensorrt as trt

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=8)

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(" ".join(msg.split()))  # one line: it ends up in a UserError
            if log.isEnabledFor(level):  # skip formatting the build's many verbose lines
                log.log(level, "TensorRT: %s", msg.rstrip())

        def recent_errors(self) -> str:
            return " | ".join(self.errors) or "no error was logged"

    return _Logger()

"""ONNX -> TensorRT plan with the raw TensorRT 10/11 API, plus the host facts a plan is tied to.

`tensorrt` and `cuda.bindings` are imported inside functions so that this module (and `check_compatibility`, which
the runtime and CPU tests use) imports on hosts without them.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from lcmtrt.runtime.errors import UserError

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


def timing_cache_path(folder: Path) -> Path:
    """The builder's timing cache in `folder`, one file per TensorRT version (a cache from another version is not
    portable)."""
    import tensorrt as trt

    return Path(folder) / f".lcmtrt-timing-{trt.__version__}.cache"


def plan_layout(name: str, batch_sizes: tuple[int, ...], refittable: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(plan path in the bundle, batch sizes it holds as profiles): one plan with a profile per batch size, or, for
    refittable engines, which TensorRT allows one optimization profile, one plan per batch size."""
    if refittable and len(batch_sizes) > 1:
        return [(f"trt/{name}.b{b}.plan", (b,)) for b in batch_sizes]
    return [(f"trt/{name}.plan", tuple(batch_sizes))]


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


def parser_errors(errors: Iterable[Any]) -> str:
    """One line per ONNX parser error: the failing node, its operator, and the parser's description."""
    parts = []
    for e in errors:
        node = f"node {e.node()}" if e.node() >= 0 else "graph"
        name, op = e.node_name(), e.node_operator()
        if name or op:
            node += f" {name!r} ({op or '?'})"
        parts.append(f"{node}: {' '.join(e.desc().split())}")
    return "; ".join(parts) or "no parser error was reported"


def write_atomic(path: Path, data: Any) -> None:
    """Write bytes-like `data` to a temporary name beside `path`, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profiles: list[dict[str, tuple[int, ...]]],
    workspace_bytes: int | None = None,
    timing_cache: Path | None = None,
    optimization_level: int | None = None,
    refittable: bool = False,
) -> None:
    """Build a strongly typed plan with one static optimization profile per dict ({input name: shape});
    `refittable` plans take new weights by ONNX initializer name (trt.Refitter) for LoRA swaps."""
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise UserError(f"cannot build {plan_path.name}: ONNX graph {onnx_path} does not exist")
    if not profiles:
        raise ValueError("build_plan needs at least one optimization profile")
    if refittable and len(profiles) > 1:  # addOptimizationProfile: at most once when building a refittable engine
        raise ValueError(f"a refittable plan takes one optimization profile, {plan_path.name} was given "
                         f"{len(profiles)}: build one plan per batch size (plan_layout)")
    logger = trt_logger()
    logger.errors.clear()
    builder = trt.Builder(logger)
    # TensorRT 11 builds every network strongly typed; on 10.x the flag makes the ONNX dtypes and Casts authoritative
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)  # owns the weights: must live until the build returns
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser.get_error(i) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if refittable:  # REFIT, not REFIT_IDENTICAL: a swap brings other weights than the build's
        config.set_flag(trt.BuilderFlag.REFIT)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    cache_blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_blob), ignore_mismatch=False):
        log.warning("timing cache %s was made on a different device; starting an empty one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for k, shapes in enumerate(profiles):
        missing, extra = set(inputs) - set(shapes), set(shapes) - set(inputs)
        if missing or extra:
            raise ValueError(f"profile {k} for {onnx_path.name}: missing {sorted(missing)}, unknown {sorted(extra)}")
        profile = builder.create_optimization_profile()
        for name in inputs:
            shape = tuple(shapes[name])
            profile.set_shape(name, shape, shape, shape)
        if config.add_optimization_profile(profile) < 0:
            raise ValueError(f"profile {k} for {onnx_path.name} is invalid: {shapes}")

    start = time.perf_counter()
    log.info("building %s from %s (%d profiles)", plan_path.name, onnx_path, len(profiles))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build {plan_path.name} from {onnx_path}: {logger.recent_errors()}")
    write_atomic(plan_path, plan)
    if timing_cache is not None:
        write_atomic(timing_cache, config.get_timing_cache().serialize())
    log.info("built %s (%.1f MiB) in %.0f s", plan_path, plan.nbytes / 2**20, time.perf_counter() - start)

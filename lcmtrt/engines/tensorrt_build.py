"""ONNX -> TensorRT plan with the raw TensorRT 10/11 API; the host facts a plan is tied to live beside the backend
(runtime/backends/tensorrt_host.py) and are re-exported here for the build.

`tensorrt` and `cuda.bindings` are imported inside functions so that this module imports on hosts without them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from lcmtrt.errors import UserError
from lcmtrt.runtime.backends.tensorrt_host import (check_compatibility, device_info, tensorrt_available,  # noqa: F401
                                                  tensorrt_unavailable_reason, trt_logger)

log = logging.getLogger(__name__)

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

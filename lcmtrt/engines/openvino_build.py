"""OpenVINO "engines": each ONNX graph converted to OpenVINO IR with static shapes, one IR per built batch size.

fp32 bundles run OpenVINO in fp32 (the parity path). bf16 bundles run the convolutions and matrix products in bf16
and keep in fp32 what the image needs (see shared/reference/openvino-precision.md): the per-row scalar path (time
and guidance embeddings, scheduler coefficients), the norms, and the LCM step / pixel tail after the last
convolution. A node is kept in fp32 by the runtime-info key `precise_0`, which only survives when the model is
saved and read back, so the IR is saved with the marks and the build verifies them on the compiled model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

from lcmtrt.bundle import TensorSpec
from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

HEAVY_OPS = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}  # run in bf16
NORM_OPS = {"MVN", "GroupNormalization", "NormalizeL2"}
SCALAR_ELEMENTS = 64  # a Parameter with at most this many elements per row feeds the scalar path (coeffs, scales)
KEEP_FP32 = "precise_0"  # runtime-info key that keeps an op's precision; saved IR carries it as:
SAVED_KEEP_FP32 = "DisablePrecisionConversion_0"


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_version() -> str:
    from lcmtrt.runtime.backends.openvino import openvino_version

    return openvino_version()


def bf16_supported(device: str = "CPU") -> bool:
    """True where OpenVINO runs bf16 natively (avx512_bf16 or AMX on CPUs); elsewhere a bf16 hint silently runs fp32."""
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def check_precision(precision: str, device: str) -> None:
    """Refuse precisions the OpenVINO device cannot run, naming the flag to use instead."""
    from lcmtrt.runtime.backends.openvino import INFERENCE_PRECISION

    if precision not in INFERENCE_PRECISION:
        raise UserError(f"unknown precision {precision!r} for OpenVINO; choose fp32 or bf16")
    if precision == "bf16" and not bf16_supported(device):
        raise UserError(f"--precision bf16 needs a CPU with bf16 (avx512_bf16 or AMX); OpenVINO's {device} here has "
                        f"none, so bf16 would silently run in fp32: use --precision fp32")
    if precision == "fp16" and device.upper().startswith("CPU"):
        raise UserError("--precision fp16 with OpenVINO is for Intel GPUs and NPUs (--device GPU); on a CPU use "
                        "--precision fp32, or bf16 where the CPU has it")


def check_device(device: str) -> str:
    """OpenVINO's name for the build's --device on this host (any case: cpu is CPU), refused when it has none."""
    import openvino as ov

    from lcmtrt.runtime.backends.openvino import check_device

    return check_device(ov.Core(), device)


def _per_row_elements(spec: TensorSpec) -> int:
    """Elements of one row: the product of the fixed dimensions (the batch axis left out)."""
    return math.prod(d for d in spec.shape if isinstance(d, int))


def mark_fp32(model: Any, inputs: tuple[TensorSpec, ...]) -> dict[str, int]:
    """Mark the ops a bf16 run keeps in fp32; returns how many of each kind were marked."""
    scalar_inputs = {t.name for t in inputs if _per_row_elements(t) <= SCALAR_ELEMENTS}
    ops = model.get_ordered_ops()
    scalar: set[str] = set()
    counts = {"scalar": 0, "norm": 0, "tail": 0}

    def sources(op: Any) -> list[Any]:
        return [port.get_source_output().get_node() for port in op.inputs()]

    for op in ops:  # forward: everything computed only from per-row scalars and constants (embeddings, coefficients)
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind == "Parameter":
            if op.get_output_tensor(0).get_names() & scalar_inputs or name in scalar_inputs:
                scalar.add(name)
            continue
        if kind == "Constant" or kind == "Result":
            continue
        if all(s.get_type_name() == "Constant" or s.get_friendly_name() in scalar for s in sources(op)) and any(
                s.get_friendly_name() in scalar for s in sources(op)):
            scalar.add(name)
            op.get_rt_info()[KEEP_FP32] = ""
            counts["scalar"] += 1
    tail: set[str] = set()  # element-wise ops between the last heavy ops and the outputs
    for op in reversed(ops):
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind in ("Result", "Constant", "Parameter"):
            continue
        consumers = [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
        if not consumers or not all(c.get_type_name() == "Result" or c.get_friendly_name() in tail for c in consumers):
            continue
        if kind not in HEAVY_OPS:
            tail.add(name)  # a heavy op ends the tail, but is kept too: its output must not be rounded to bf16
        if name not in scalar:
            op.get_rt_info()[KEEP_FP32] = ""
            counts["tail"] += 1
    for op in ops:
        if op.get_type_name() in NORM_OPS:
            op.get_rt_info()[KEEP_FP32] = ""
            counts["norm"] += 1
            for target in (t for out in op.outputs() for t in out.get_target_inputs()):  # the affine after it
                node = target.get_node()
                if node.get_type_name() in ("Multiply", "Add"):
                    node.get_rt_info()[KEEP_FP32] = ""
    return counts


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def ir_name(engine: str, batch: int) -> str:
    return f"ov/{engine}.b{batch}.xml"


def convert_graph(onnx_path: Path, bundle_dir: Path, engine: str, inputs: tuple[TensorSpec, ...],
                  batch_sizes: tuple[int, ...], precision: str) -> list[Path]:
    """Write ov/<engine>.b<batch>.xml/.bin for each batch size; identical weight files are hard-linked, so the
    weights are stored once. Returns the files written."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types; report the reason on one line
        raise UserError(f"OpenVINO cannot convert {onnx_path.name}: {str(e).splitlines()[0]}") from None
    if precision != "fp32":
        counts = mark_fp32(model, inputs)
        log.info("      %s: kept in fp32: %d scalar-path, %d norm, %d tail ops", engine, counts["scalar"],
                 counts["norm"], counts["tail"])
    written: list[Path] = []
    first_bin: tuple[Path, str] | None = None
    for batch in batch_sizes:
        model.reshape({t.name: ov.PartialShape(list(t.concrete(batch))) for t in inputs})
        xml = bundle_dir / ir_name(engine, batch)
        ov.save_model(model, str(xml), compress_to_fp16=False)  # fp32 weights; precision is chosen at compile time
        weights = xml.with_suffix(".bin")
        digest = _digest(weights)
        if first_bin is not None and digest == first_bin[1]:
            weights.unlink()
            try:
                os.link(first_bin[0], weights)
            except OSError:  # a file system without hard links keeps a copy
                (weights).write_bytes(first_bin[0].read_bytes())
        elif first_bin is None:
            first_bin = (weights, digest)
        written += [xml, weights]
    return written


def verify_fp32_marks(xml: Path, device: str, precision: str) -> tuple[int, int]:
    """Compile the saved IR and count the marked ops that really run in fp32: (kept, marked). The CPU plugin drops a
    mark on ops its own rewrites rebuild, so the build reports what held, read from the runtime graph."""
    import openvino as ov

    from lcmtrt.runtime.backends.openvino import INFERENCE_PRECISION

    core = ov.Core()
    model = core.read_model(str(xml))
    marked = {op.get_friendly_name() for op in model.get_ordered_ops()
              if {KEEP_FP32, SAVED_KEEP_FP32} & set(op.get_rt_info().keys())}
    compiled = core.compile_model(model, device, {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]})
    kept = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["runtimePrecision"].astype(str) != "f32":
            continue
        kept.update(name for name in info["originalLayersNames"].astype(str).split(",") if name in marked)
    return len(kept), len(marked)

"""OpenVINO "engines": each ONNX graph converted to OpenVINO IR with static shapes, one IR per built batch size.

fp32 bundles run OpenVINO in fp32 (the parity path). bf16 bundles compile the fp32 IR (with one more rewrite,
below) with OpenVINO's bf16 inference precision. What a bf16 image needs kept in fp32 never enters the graph: the
sinusoidal timestep and guidance embeddings are computed on the host in fp32 and fed as inputs
(runtime/embeddings.py). Per-op fp32 marks were measured to change nothing once that is so (sd15-random at 256x256:
99.42% of pixels within 1/255 of fp32 with marks on the scalar path, norms and tail, 99.37% without), so there are
none; the build records, from the compiled model, how many convolutions and matrix products really run at each
precision. The IR (fp32, bf16, int8) holds each GroupNorm as one GroupNormalization op, as optimum-intel's does, and
each nearest-2x upsampling convolution as four 2x2 convolutions at the source resolution; bf16 and int8 IR also hold
each GEGLU projection as two matrix products (openvino_fusion.py). int8 bundles start from that IR and are quantized
by NNCF once every graph is converted (openvino_quantize.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path


from lcmtrt.bundle import TensorSpec
from lcmtrt.engines.openvino_fusion import fold_upsample_convs, fuse_group_norms, split_geglu_projections
from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

# measured faster in bf16, and not bit for bit in fp32 (openvino_fusion.py); int8 runs its unquantized ops in bf16 on
# CPUs with it
LOW_PRECISION_REWRITES = ("bf16", "int8")
HEAVY_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}  # runtime layer types


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def nncf_available() -> bool:
    """Whether int8 bundles can be built: NNCF is found (not imported: it imports torch)."""
    return importlib.util.find_spec("nncf") is not None


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
        raise UserError(f"unknown precision {precision!r} for OpenVINO; choose fp32, bf16 or int8")
    if precision == "int8":
        if not nncf_available():
            raise UserError("--precision int8 quantizes with NNCF, which is not installed here: "
                            "pip install 'lcmtrt[openvino]'")
        if not device.upper().startswith("CPU"):
            raise UserError(f"--precision int8 is built and checked for CPUs only; OpenVINO's {device} takes "
                            "--precision fp16 (or build int8 with --device cpu)")
        from lcmtrt.runtime.backends.cpu import warn_if_int8_slow

        warn_if_int8_slow()
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
    """Write ov/<engine>.b<batch>.xml/.bin for each batch size (fp32, bf16 and int8: GroupNorm chains fused,
    upsampling convolutions folded; bf16 and int8: GEGLU projections split; openvino_fusion.py);
    identical weight files are hard-linked, so the weights are stored once. Returns the files written."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types; report the reason on one line
        raise UserError(f"OpenVINO cannot convert {onnx_path.name}: {str(e).splitlines()[0]}") from None
    written: list[Path] = []
    first_bin: tuple[Path, str] | None = None
    for batch in batch_sizes:
        reshape(model, inputs, batch)
        # measured on CPUs at these precisions (bf16 on a Zen 4, README); fp16 for Intel GPUs/NPUs, untested here,
        # keeps the graph as converted. On static shapes; a later batch size finds nothing left to rewrite.
        if precision in ("fp32", "bf16", "int8"):
            fused, folded = fuse_group_norms(model), fold_upsample_convs(model)
            if fused:
                log.info("      %s: %d GroupNorms as OpenVINO GroupNormalization ops", engine, fused)
            if folded:
                log.info("      %s: %d upsampling convolutions as 2x2 phase convolutions at the source resolution",
                         engine, folded)
        if precision in LOW_PRECISION_REWRITES:
            split = split_geglu_projections(model)
            if split:
                log.info("      %s: %d GEGLU projections as two matrix products each", engine, split)
        xml = bundle_dir / ir_name(engine, batch)
        first_bin = save_ir(model, xml, first_bin)
        written += [xml, xml.with_suffix(".bin")]
    return written


def reshape(model: "ov.Model", inputs: tuple[TensorSpec, ...], batch: int) -> None:
    """Static shapes for `batch` rows (in place)."""
    import openvino as ov

    model.reshape({t.name: ov.PartialShape(list(t.concrete(batch))) for t in inputs})


def save_ir(model: "ov.Model", xml: Path, first_bin: tuple[Path, str] | None) -> tuple[Path, str]:
    """Write `model` as xml + bin with its weights as they are (no fp16 compression: precision is chosen at compile
    time); a bin identical to `first_bin` (path, digest) becomes a hard link to it. An IR already at `xml` is
    unlinked first, never written through: its bin may be a hard link that another batch size's IR still reads."""
    import openvino as ov

    weights = xml.with_suffix(".bin")
    xml.unlink(missing_ok=True)
    weights.unlink(missing_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    digest = _digest(weights)
    if first_bin is None or digest != first_bin[1]:
        return first_bin or (weights, digest)
    weights.unlink()
    try:
        os.link(first_bin[0], weights)
    except OSError:  # a file system without hard links keeps a copy
        weights.write_bytes(first_bin[0].read_bytes())
    return first_bin


def compiled_precisions(xml: Path, device: str, precision: str) -> dict[str, int]:
    """Compile the saved IR as a bundle of `precision` is compiled and count its convolutions and matrix products by
    the precision they run at on the runtime graph (e.g. {"bf16": 84, "f32": 0}; int8's quantized ones as u8/i8):
    where a bf16 hint silently runs fp32, or a quantized op is not run in int8, this says so."""
    import openvino as ov

    from lcmtrt.runtime.backends.openvino import compile_config

    core = ov.Core()
    return runtime_precisions(core.compile_model(core.read_model(str(xml)), device, compile_config(precision)))


def runtime_precisions(compiled: "ov.CompiledModel") -> dict[str, int]:
    """A compiled model's convolutions and matrix products counted by the precision they run at."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in HEAVY_LAYERS:
            runs_at = info["runtimePrecision"].astype(str)
            counts[runs_at] = counts.get(runs_at, 0) + 1
    return counts

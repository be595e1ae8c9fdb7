"""Export one stage module to ONNX, check the graph, and compare it with the torch module on the same inputs."""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmtrt.export.batch_invariance import pad_to_packets
from lcmtrt.bundle import TensorSpec

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is one op from 17; TensorRT 10/11 and ONNX Runtime parse it
PROTOBUF_LIMIT = 2**31 - 1  # above this a graph's weights go to one external-data file


@dataclass(frozen=True)
class ExportedGraph:
    name: str
    path: Path
    files: tuple[Path, ...]  # the graph and its external-data file, if any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_abs_error: float | None  # vs torch on the example inputs; None when ONNX Runtime on this host cannot run it
    refit_weights: tuple[str, ...] = ()  # initializers named by their parameters, replaceable after the build


ONNX_BATCH_DIMS = {"batch": "batch", "2*batch": "batch_x2"}  # distinct names: TensorRT equates same-named dims


def _spec(name: str, tensor: torch.Tensor, axis: str | None) -> TensorSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    shape = tuple(tensor.shape)
    return TensorSpec(name, dtype, ((axis,) + shape[1:]) if axis else shape)


def export_graph(
    name: str,
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    batch_axes: dict[str, str | None],
    dest_dir: Path,
    refittable: bool = False,
) -> ExportedGraph:
    """Export `module(*inputs.values())` as dest_dir/<name>.onnx. Axis 0 of every tensor is a dynamic "batch" axis
    unless `batch_axes` says "2*batch" (CFG's doubled rows) or None (no batch axis). `refittable` keeps every
    Linear/Conv weight an external initializer named by its parameter (no constant folding), so LoRA swaps can
    replace it (ONNX Runtime's add_external_initializers, TensorRT's Refitter)."""
    module = module.eval()
    args = tuple(inputs.values())
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    axes = {n: batch_axes.get(n, "batch") for n in list(inputs) + output_names}
    dynamic_axes = {n: {0: ONNX_BATCH_DIMS[a]} for n, a in axes.items() if a}
    dest = dest_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f".{name}-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=list(inputs),
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=not refittable,
                dynamo=False,
            )
        files = _finalize(raw, dest, external=refittable)
    error = _compare(dest, inputs, output_names, expected)
    specs_in = tuple(_spec(n, t, axes[n]) for n, t in inputs.items())
    specs_out = tuple(_spec(n, t, axes[n]) for n, t in zip(output_names, expected))
    refit = _refit_weights(dest, module) if refittable else ()
    return ExportedGraph(name, dest, files, specs_in, specs_out, error, refit)


def _refit_weights(path: Path, module: torch.nn.Module) -> tuple[str, ...]:
    """The graph's initializers that are Linear/Conv weights of `module`, under their parameter names."""
    import onnx

    layers = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    return tuple(sorted(names & layers))


def _finalize(raw: Path, dest: Path, external: bool = False) -> tuple[Path, ...]:
    """Infer shapes, make rows batch-invariant (batch_invariance.py), check the result, and save it (weights in one
    external file when over protobuf's limit, or always when `external`)."""
    import onnx

    # The exporter already moved weights out of a graph over protobuf's limit (which cannot even be measured
    # in memory); a graph that fits is small enough to inline.
    model = onnx.load(str(raw), load_external_data=False)
    large = external or raw.stat().st_size > PROTOBUF_LIMIT or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    staging = dest.with_name(f".{dest.name}.partial")
    if not large:
        _rewrite_and_check(model, staging, full_check=True)
        staging.replace(dest)
        return (dest,)
    data_name = dest.name + ".data"
    staging_data = dest.with_name(data_name + ".partial")
    onnx.save_model(onnx.load(str(raw)), str(staging), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=staging_data.name, size_threshold=0)
    # the graph without its weights from here on: rewritten and checked beside the weights' staging file
    model = _rewrite_and_check(onnx.load(str(staging), load_external_data=False), staging, full_check=False)
    # Point the graph at the final data name before the renames, so it never points at a temporary file.
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save_model(model, str(staging))
    written = [dest]
    if staging_data.is_file():  # onnx moves only tensors stored as raw data (all of torch's) out of the graph
        staging_data.replace(dest.with_name(data_name))
        written.append(dest.with_name(data_name))
    staging.replace(dest)
    return tuple(written)


def _rewrite_and_check(model: Any, path: Path, full_check: bool) -> Any:
    """The one rewrite of every exported graph, then its check: shapes inferred, Sin/Cos padded to whole packets
    (batch_invariance.py), shapes inferred again over the new nodes, saved to `path` and checked there (by path, so
    a graph whose weights are an external file beside it is checked too). `full_check`: strict shape inference and
    the checker's full check (graphs that fit in memory; large ones keep the lighter check they always had)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model, check_type=full_check, strict_mode=full_check)
    if pad_to_packets(model):
        model = onnx.shape_inference.infer_shapes(model, check_type=full_check, strict_mode=full_check)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=full_check)
    return model


def _compare(path: Path, inputs: dict[str, torch.Tensor], output_names: list[str], expected: tuple) -> float | None:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's CPU provider lacks some fp16 kernels
        log.info("skipped the numeric check of %s: ONNX Runtime cannot run it here (%s)", path.name, str(e)[:120])
        return None
    feeds = {n: t.numpy() for n, t in inputs.items()}
    got = session.run(output_names, feeds)
    errors = [
        float(np.max(np.abs(g.astype(np.float64) - e.numpy().astype(np.float64)))) if g.size else 0.0
        for g, e in zip(got, expected)
    ]
    return max(errors)

"""ONNX Runtime "engines": each graph optimized once for the provider it will run on, saved in the bundle."""

from __future__ import annotations

import logging
from pathlib import Path

from lcmtrt.errors import UserError

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1 << 30  # optimized graphs above this keep their weights in one external file


def cuda_usable() -> bool:
    """True when ONNX Runtime's CUDA provider really runs here (it silently falls back to CPU otherwise)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the fallback warning is the expected answer on CPU hosts
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure means no usable CUDA provider
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


def providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def optimize_graph(onnx_path: Path, out_path: Path, device: str) -> list[Path]:
    """Run ONNX Runtime's provider-independent optimizations once and save the result; returns the files written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # EXTENDED fusions are valid for the provider chosen here; ALL adds layout changes that are redone at load time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_path)
    data_name = out_path.name + ".data"
    large = onnx_path.stat().st_size + sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + ".data"))
    if large > EXTERNAL_DATA_THRESHOLD:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(onnx_path), options, providers=providers(device))
    except Exception as e:  # noqa: BLE001 - report ONNX Runtime's reason on one line
        raise UserError(f"ONNX Runtime could not load {onnx_path.name} for {device}: {str(e).splitlines()[0]}") from None
    written = [out_path]
    if (out_path.parent / data_name).is_file():
        written.append(out_path.parent / data_name)
    return written

"""Export stage: graphs checked against torch at export time, fp16 graphs typed for strongly typed TensorRT,
graphs over protobuf's limit saved with one external-data file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lcmtrt.engines.build import build_bundle
from lcmtrt.engines.preset import load_preset
from lcmtrt.bundle import load_bundle
from lcmtrt.runtime.pipeline import Pipeline

NORMS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization"}


@pytest.fixture(scope="module")
def fp16_bundle(tiny_sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "tiny-sd15-fp16"
    build_bundle(load_preset("tiny-sd15").with_overrides(batch_sizes=(1,)), out, "onnxruntime", "fp16")
    return out


def test_fp32_graphs_match_torch(tiny_sd15_bundle: Path) -> None:
    errors = load_bundle(tiny_sd15_bundle).build["export_max_abs_error"]
    assert errors["text"] < 1e-4 and errors["denoise"] < 1e-4 and errors["vae_encode"] < 1e-4
    assert errors["vae_decode"] <= 1  # uint8 output: at most one rounding step apart


def test_engine_io_is_precision_independent(tiny_sd15_bundle: Path, fp16_bundle: Path) -> None:
    for path in (tiny_sd15_bundle, fp16_bundle):
        bundle = load_bundle(path)
        dtypes = {t.name: t.dtype for e in bundle.engines.values() for t in e.inputs + e.outputs}
        assert dtypes == {"input_ids": "int32", "prompt_embeds": "float32", "latents": "float32",
                          "coeffs": "float32", "noise": "float32", "time_embedding": "float32",
                          "guidance_embedding": "float32",
                          "next_latents": "float32", "denoised": "float32", "images": "uint8",
                          "sample_noise": "float32"}


@pytest.mark.parametrize("stage", ["text", "denoise", "vae_decode", "vae_encode"])
def test_fp16_graphs_keep_norms_in_fp32(fp16_bundle: Path, stage: str) -> None:
    """Strongly typed TensorRT computes a norm in its input's type, so fp16 graphs feed norms fp32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_bundle / "onnx" / f"{stage}.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    norms = [n for n in model.graph.node if n.op_type in NORMS]
    assert norms, "expected normalisation layers"
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "fp16 graph holds no fp16 weights"


def test_fp16_bundle_close_to_fp32(tiny_sd15_bundle: Path, fp16_bundle: Path) -> None:
    prompt = "a watercolor of a fox"
    full = Pipeline.load(tiny_sd15_bundle).generate([prompt], seed=0).images.astype(np.int16)
    half = Pipeline.load(fp16_bundle).generate([prompt], seed=0).images.astype(np.int16)
    assert np.abs(full - half).max() <= 3


def test_external_data_graphs(tiny_sd15_dir: Path, tiny_sd15_bundle: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the >2 GB path on the tiny model: weights in one .data file per graph, same images."""
    from lcmtrt.engines import onnxruntime_build
    from lcmtrt.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    monkeypatch.setattr(onnxruntime_build, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "external"
    build_bundle(load_preset("tiny-sd15").with_overrides(batch_sizes=(1,)), out, "onnxruntime", "fp32")
    manifest = json.loads((out / "bundle.json").read_text())
    for stage in ("text", "denoise", "vae_decode", "vae_encode"):
        assert f"onnx/{stage}.onnx.data" in manifest["files"]
        assert f"ort/{stage}.onnx.data" in manifest["files"]
    assert not list(out.rglob("*.partial"))
    prompt = "a red bicycle"
    expected = Pipeline.load(tiny_sd15_bundle).generate([prompt], seed=2).images
    np.testing.assert_array_equal(Pipeline.load(out).generate([prompt], seed=2).images, expected)

"""The OpenVINO IR rewrites (engines/openvino_fusion.py), the exporter's GroupNorm decomposition, the upsampling
convolutions and the GEGLU projections: what each rewrites, that the result computes the same, and what it leaves
alone."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
import openvino.opset13 as ops  # noqa: E402

from lcmtrt.engines.openvino_fusion import (_phase_kernel, fold_upsample_convs, fuse_group_norms,  # noqa: E402
                                           split_geglu_projections)


def kinds(model) -> Counter:
    return Counter(op.get_type_name() for op in model.get_ordered_ops())


def run(model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request().infer({0: x})[0]


def reread(model, xml: Path):
    """`model` saved as lcmtrt saves IR (no fp16 compression) and read back."""
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return ov.Core().read_model(str(xml))


def norms_module():
    """GroupNorms as diffusers uses them: with and without affine, on a 4-D map and on a 3-D [N, C, L] tensor."""
    import torch

    class Norms(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.plain = torch.nn.GroupNorm(4, 8), torch.nn.GroupNorm(2, 8, affine=False, eps=1e-6)
            torch.nn.init.normal_(self.first.weight)
            torch.nn.init.normal_(self.first.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.silu(self.first(x))
            return self.plain(y.flatten(2)).view(x.shape) + x

    return Norms().eval()


def export_and_convert(module, x, path: Path, batch: int):
    """`module` exported as lcmtrt exports (TorchScript, opset 17, dynamic batch), converted by OpenVINO at a static
    `batch`: (model, input, torch's output)."""
    import torch

    from lcmtrt.export.onnx_export import OPSET

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET, dynamo=False)
        expected = module(x[:batch]).numpy()
    model = ov.convert_model(str(path))
    model.reshape({"x": [batch, *x.shape[1:]]})
    return model, x[:batch].numpy(), expected


def exported(tmp_path: Path, batch: int):
    """The torch GroupNorms, exported and converted."""
    import torch

    x = torch.randn(2, 8, 6, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    return export_and_convert(norms_module(), x, tmp_path / "norms.onnx", batch)


@pytest.mark.parametrize("batch", [1, 2])
def test_exported_group_norms_become_one_op_each(tmp_path: Path, batch: int) -> None:
    model, x, expected = exported(tmp_path, batch)
    before = kinds(model)
    assert before["MVN"] == 2 and before["GroupNormalization"] == 0
    unfused = run(model, x)
    assert fuse_group_norms(model) == 2
    after = kinds(model)
    assert after["GroupNormalization"] == 2 and after["MVN"] == 0
    assert after["Reshape"] == before["Reshape"] - 4  # each chain's two Reshapes are gone
    assert after["Multiply"] == before["Multiply"] - 1  # the affine GroupNorm's weight is the op's scale
    fused = run(model, x)
    np.testing.assert_allclose(fused, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=2e-5)
    assert fuse_group_norms(model) == 0  # nothing left to fuse: a second batch size's pass is a no-op


def chain(shape: list[int], target: list[int], axes: list[int], variance: bool = True, mode: str = "inside_sqrt",
          weight: np.ndarray | None = None):
    """Reshape(x, target) -> MVN(axes) -> Reshape(., ShapeOf(x)) [-> Multiply(weight)] as a model."""
    x = ops.parameter(shape, np.float32, name="x")
    grouped = ops.reshape(x, ops.constant(np.array(target, np.int64)), True)
    norm = ops.mvn(grouped, ops.constant(np.array(axes, np.int64)), variance, 1e-5, mode)
    y = ops.reshape(norm, ops.shape_of(x), False)
    if weight is not None:
        y = ops.multiply(y, ops.constant(weight))
    return ov.Model([y], [x])


@pytest.mark.parametrize("case", [
    dict(target=[0, 4, -1], axes=[1]),  # normalises across groups, not within one
    dict(target=[0, 4, -1], axes=[2], variance=False),  # centring only
    dict(target=[0, 4, -1], axes=[2], mode="outside_sqrt"),  # epsilon added outside the root
    dict(target=[0, 3, -1], axes=[2]),  # 8 channels do not split into 3 groups
    dict(target=[0, 4, 60], axes=[2]),  # not the exporter's [0, G, -1]
])
def test_other_normalisations_are_left_alone(case: dict) -> None:
    model = chain([1, 8, 6, 5], **case)
    assert fuse_group_norms(model) == 0 and kinds(model)["GroupNormalization"] == 0


def test_only_a_per_channel_weight_is_folded() -> None:
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 5)).astype(np.float32)
    weight = np.random.default_rng(1).standard_normal((8, 6, 1)).astype(np.float32)  # per channel and row
    model = chain([1, 8, 6, 5], [0, 4, -1], [2], weight=weight)
    expected = run(model, x)
    assert fuse_group_norms(model) == 1
    assert kinds(model)["Multiply"] == 1  # kept as it was, after the fused op
    np.testing.assert_allclose(run(model, x), expected, rtol=0, atol=2e-5)


def upsample_module(channels: int = 6):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution with bias) followed by a plain 3x3 convolution."""
    import torch

    class Upsample(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, 5, 3, padding=1)
            self.after = torch.nn.Conv2d(5, 4, 3, padding=1)  # reads a map that is not an upsample: left alone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.after(self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")))

    return Upsample().eval()


def exported_upsample(tmp_path: Path, batch: int, shape: tuple[int, int] = (5, 7)):
    import torch

    x = torch.randn(2, 6, *shape, generator=torch.Generator().manual_seed(0))
    return export_and_convert(upsample_module(), x, tmp_path / "up.onnx", batch)


@pytest.mark.parametrize("batch", [1, 2])
def test_upsampling_convolution_becomes_four_phase_convolutions(tmp_path: Path, batch: int) -> None:
    model, x, expected = exported_upsample(tmp_path, batch)
    before = kinds(model)
    assert before["Interpolate"] == 1 and before["Convolution"] == 2
    unfolded = run(model, x)
    assert fold_upsample_convs(model) == 1
    after = kinds(model)
    assert after["Interpolate"] == 0 and after["DepthToSpace"] == 1 and after["Convolution"] == 2 - 1 + 4
    kernels = sorted(tuple(op.get_input_shape(1)) for op in model.get_ordered_ops()
                     if op.get_type_name() == "Convolution")
    assert kernels == [(4, 5, 3, 3)] + [(5, 6, 2, 2)] * 4  # the later 3x3 convolution is left as it was
    folded = run(model, x)
    assert folded.shape == expected.shape
    np.testing.assert_allclose(folded, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(folded, unfolded, rtol=0, atol=2e-5)
    assert fold_upsample_convs(model) == 0  # a second batch size's pass finds nothing left


def upsample_then_conv(mode: str = "nearest", scale: float = 2.0, kernel: int = 3, stride: int = 1, pad: int = 1,
                       consumers: int = 1):
    """Interpolate(x) -> Convolution as a model, varied one way at a time from Upsample2D's pair."""
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 3, 4, 4], np.float32, name="x")
    up = ops.interpolate(x, ops.constant(np.array([scale, scale], np.float32)), mode, "scales",
                         axes=ops.constant(np.array([2, 3], np.int64)), coordinate_transformation_mode="asymmetric",
                         nearest_mode="floor")
    weights = ops.constant(rng.standard_normal((2, 3, kernel, kernel)).astype(np.float32))
    outputs = [ops.convolution(up, weights, [stride, stride], [pad, pad], [pad, pad], [1, 1])]
    if consumers == 2:
        outputs.append(ops.relu(up))
    return ov.Model(outputs, [x])


@pytest.mark.parametrize("case", [
    dict(mode="linear"),  # bilinear: source pixels are not repeated
    dict(scale=3.0),  # 3x3 blocks of equal values, not 2x2
    dict(scale=2.1),  # output floor(4 * 2.1) = 8 as for 2x, but source pixel floor(i / 2.1): not 2x2 blocks
    dict(kernel=1, pad=0),  # a 1x1 convolution gains nothing
    dict(stride=2),
    dict(pad=0),  # a different output size
    dict(consumers=2),  # the upsampled map is needed as it is
])
def test_other_upsampling_pairs_are_left_alone(case: dict) -> None:
    model = upsample_then_conv(**case)
    before = kinds(model)
    assert fold_upsample_convs(model) == 0 and kinds(model) == before


def test_phase_kernels_sum_the_taps_on_each_source_pixel() -> None:
    kernel = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    assert _phase_kernel(kernel, 0, 0)[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert _phase_kernel(kernel, 1, 1)[0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert _phase_kernel(kernel, 0, 1)[0, 0].tolist() == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]


def geglu_module(chunks: int = 2):
    """diffusers' GEGLU (a projection to twice the width, chunked into a value and a gate) and the output projection;
    with chunks=3 the projection is cut in three, which is not the pattern."""
    import torch

    class FeedForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.out = torch.nn.Linear(8, 6 * chunks), torch.nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = self.proj(x).chunk(chunks, dim=-1)
            return self.out(parts[0] * torch.nn.functional.gelu(parts[-1])) + x

    return FeedForward().eval()


def exported_geglu(tmp_path: Path, batch: int, chunks: int = 2):
    import torch

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    return export_and_convert(geglu_module(chunks), x, tmp_path / "geglu.onnx", batch)


@pytest.mark.parametrize("batch", [1, 2])
def test_geglu_projection_becomes_two_matrix_products(tmp_path: Path, batch: int) -> None:
    model, x, expected = exported_geglu(tmp_path, batch)
    before = kinds(model)
    assert before["MatMul"] == 2 and before["Slice"] == 2
    whole = run(model, x)
    assert split_geglu_projections(model) == 1
    after = kinds(model)
    assert after["MatMul"] == 3 and after["Slice"] == 0
    widths = sorted(op.get_output_partial_shape(0)[2].get_length() for op in model.get_ordered_ops()
                    if op.get_type_name() == "MatMul")
    assert widths == [6, 6, 8]  # value and gate halves, then the output projection
    split = run(model, x)
    np.testing.assert_allclose(split, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(split, whole, rtol=0, atol=2e-5)
    assert split_geglu_projections(model) == 0  # a second batch size's pass finds nothing left


def test_a_projection_cut_in_three_is_left_alone(tmp_path: Path) -> None:
    model, x, expected = exported_geglu(tmp_path, 1, chunks=3)
    before = kinds(model)
    assert split_geglu_projections(model) == 0
    after = kinds(model)  # the chunk bounds' ShapeOf arithmetic is folded into constants, nothing else changes
    assert (after["MatMul"], after["Slice"]) == (before["MatMul"], before["Slice"]) == (2, 2)  # first and last third
    np.testing.assert_allclose(run(model, x), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("elsewhere", ["value", "shape"])
def test_a_projection_read_elsewhere_too_is_left_alone(elsewhere: str) -> None:
    """The whole projection is still needed (here as a model output): its value, or its shape beyond the bounds of
    the two halves (which would keep the whole product computed next to the halves)."""
    x = ops.parameter([1, 5, 8], np.float32, name="x")
    projected = ops.add(ops.matmul(x, ops.constant(np.ones((12, 8), np.float32)), False, True),
                        ops.constant(np.zeros(12, np.float32)))
    bounds = [ops.constant(np.array([v], np.int64)) for v in (0, 6, 12, 1, -1)]
    first = ops.slice(projected, bounds[0], bounds[1], bounds[3], bounds[4])
    second = ops.slice(projected, bounds[1], bounds[2], bounds[3], bounds[4])
    # a map of the projection's shape: ShapeOf(projection) read by more than the halves' bounds
    other = ops.relu(projected) if elsewhere == "value" else ops.broadcast(ops.constant(np.float32(1)),
                                                                            ops.shape_of(projected))
    model = ov.Model([ops.multiply(first, second), other], [x])
    assert split_geglu_projections(model) == 0


@pytest.mark.parametrize("exported_model, rewrite, kind, count", [
    (exported, fuse_group_norms, "GroupNormalization", 2),
    (exported_upsample, fold_upsample_convs, "DepthToSpace", 1),
    (exported_geglu, split_geglu_projections, "Slice", 0),
], ids=["group_norms", "upsampling", "geglu"])
def test_rewritten_ir_saved_and_read_back(tmp_path: Path, exported_model, rewrite, kind: str, count: int) -> None:
    model, x, expected = exported_model(tmp_path, 1)
    assert rewrite(model) > 0
    again = reread(model, tmp_path / "rewritten.xml")
    assert kinds(again)[kind] == count and [p.get_any_name() for p in again.outputs] == ["y"]
    np.testing.assert_allclose(run(again, x), expected, rtol=0, atol=2e-5)

"""GroupNorm as layout-keeping reductions against GroupNormalization in bf16: tried for the VAE and not shipped
(README, Benchmarks, "Two rewrites were tried").

In bf16 OpenVINO's CPU plugin runs convolutions channels-last and each GroupNormalization as Reshape -> MVN on the
planar layout, so every norm of the VAE decoder is wrapped in two layout reorders (a fifth of a bf16 decode on a
Xeon with AMX, per OpenVINO's profile). `rewrite` below computes per-channel means over the spatial axes, their
group averages, the variance from the centred values (two passes, as MVN), and x * a + b with per-channel
a = scale / sqrt(var + eps) and b = bias - mean * a: ops that keep any layout.

1. Speed and error on the bundle's engine: reads one engine's IR from a bundle whose IR holds GroupNormalization ops
   (an fp32 bundle), rewrites a copy, compiles both in bf16 in this process and alternates them (original,
   rewritten, rewritten, original) after a warm-up; each is compared with the original compiled in f32 on the same
   random inputs.
2. Why it is not shipped: a convolution -> GroupNorm -> convolution model whose groups have a mean of k standard
   deviations, in bf16, against float64. MVN keeps its statistics in f32 inside one kernel; the rewrite passes a and
   b between ops, which bf16 rounds, so its error grows with k (a random-weight VAE's norms have k < 1; a trained
   model's are not measured here).

usage: python scripts/gn-reduce-check.py FP32_BUNDLE [--engine vae_decode] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def group_mean(per_channel: ov.Node, channels: int, groups: int) -> ov.Node:
    """[N, C] per-channel values -> each channel's group mean, [N, C]."""
    size = channels // groups
    grouped = ops.reshape(per_channel, ops.constant(np.array([0, groups, size], np.int64)), True)
    mean = ops.reduce_mean(grouped, ops.constant(np.array([2], np.int64)), True)
    spread = ops.multiply(mean, ops.constant(np.ones((1, 1, size), np.float32)))
    return ops.reshape(spread, ops.constant(np.array([0, channels], np.int64)), True)


def rewrite(model: ov.Model) -> int:
    """Every GroupNormalization of a static [N, C, ...] tensor as reductions and one x * a + b, in place."""
    rewritten = 0
    for norm in [op for op in model.get_ordered_ops() if op.get_type_name() == "GroupNormalization"]:
        x = norm.input_value(0)
        dims = [d.get_length() for d in x.get_partial_shape()]
        channels, groups = dims[1], int(norm.get_attributes()["num_groups"])
        scale = norm.input_value(1).get_node().get_data().reshape(1, channels).astype(np.float32)
        bias = norm.input_value(2).get_node().get_data().reshape(1, channels).astype(np.float32)
        spatial = ops.constant(np.arange(2, len(dims), dtype=np.int64))
        per_channel = ops.constant(np.array([0, channels] + [1] * (len(dims) - 2), np.int64))
        mean = group_mean(ops.reduce_mean(x, spatial, False), channels, groups)
        centred = ops.subtract(x, ops.reshape(mean, per_channel, True))
        variance = group_mean(ops.reduce_mean(ops.multiply(centred, centred), spatial, False), channels, groups)
        epsilon = ops.constant(np.float32(norm.get_attributes()["epsilon"]))
        factor = ops.divide(ops.constant(scale), ops.sqrt(ops.add(variance, epsilon)))
        shift = ops.subtract(ops.constant(bias), ops.multiply(mean, factor))
        out = ops.add(ops.multiply(x, ops.reshape(factor, per_channel, True)), ops.reshape(shift, per_channel, True))
        names = norm.output(0).get_names()
        norm.output(0).replace(out.output(0))
        if names:
            out.output(0).set_names(names)
        rewritten += 1
    model.validate_nodes_and_infer_types()
    return rewritten


def engine_check(core: ov.Core, xml: str, rounds: int) -> None:
    original, rewritten = core.read_model(xml), core.read_model(xml)
    print(f"{xml}: {rewrite(rewritten)} GroupNormalization ops rewritten as reductions")
    bf16 = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}
    requests = {"original": core.compile_model(original, "CPU", bf16).create_infer_request(),
                "rewritten": core.compile_model(rewritten, "CPU", bf16).create_infer_request()}
    reference = core.compile_model(original, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {port.get_any_name(): rng.standard_normal(list(port.get_shape())).astype(port.get_element_type().to_dtype())
             for port in reference.model_inputs}
    reference.infer(feeds)
    expected = reference.get_output_tensor(0).data.astype(np.float64)
    for side, request in requests.items():
        request.infer(feeds)  # warm-up, and the output compared with f32
        error = np.abs(request.get_output_tensor(0).data.astype(np.float64) - expected)
        print(f"  {side} bf16 against f32: max {error.max():.4g}, mean {error.mean():.4g}")
    times: dict[str, list[float]] = {"original": [], "rewritten": []}
    for _ in range(rounds):
        for side in ("original", "rewritten", "rewritten", "original"):
            start = time.perf_counter()
            requests[side].infer(feeds)
            times[side].append(time.perf_counter() - start)
    ratios = [sum(times["original"][2 * r:2 * r + 2]) / sum(times["rewritten"][2 * r:2 * r + 2])
              for r in range(rounds)]
    print(f"  per call: original median {statistics.median(times['original']) * 1e3:.0f} ms, rewritten "
          f"{statistics.median(times['rewritten']) * 1e3:.0f} ms; original / rewritten per round: median "
          f"{statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x")


def offset_check(core: ov.Core, channels: int = 64, groups: int = 32, size: int = 32, epsilon: float = 1e-6) -> None:
    """Identity 1x1 convolutions around a GroupNorm, inputs k + N(0, 1): the norm's own bf16 error against float64."""
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    identity = ops.constant(np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1))

    def model() -> ov.Model:
        x = ops.parameter([1, channels, size, size], np.float32, name="x")
        h = ops.convolution(x, identity, [1, 1], [0, 0], [0, 0], [1, 1])
        norm = ops.group_normalization(h, ops.constant(scale), ops.constant(bias), groups, epsilon)
        return ov.Model([ops.convolution(norm, identity, [1, 1], [0, 0], [0, 0], [1, 1])], [x])

    rewritten = model()
    rewrite(rewritten)
    bf16 = {"INFERENCE_PRECISION_HINT": "bf16"}
    compiled = {"GroupNormalization": core.compile_model(model(), "CPU", bf16),
                "reductions": core.compile_model(rewritten, "CPU", bf16)}
    print("a GroupNorm whose groups have mean k standard deviations, bf16 against float64 (max / mean abs error):")
    for k in (0, 1, 3, 10, 30, 100):
        x = (k + np.random.default_rng(0).standard_normal((1, channels, size, size))).astype(np.float32)
        # the reference normalises the input as the bf16 convolution passes it on: rounded to bf16 (to nearest even)
        rounded = (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) & 0xFFFF0000
        grouped = rounded.view(np.float32).astype(np.float64).reshape(1, groups, -1)
        normal = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + epsilon)
        expected = normal.reshape(x.shape) * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        errors = {side: np.abs(c(x)[0] - expected) for side, c in compiled.items()}
        print(f"  k = {k:3d}: " + "; ".join(f"{side} {e.max():.3f} / {e.mean():.4f}" for side, e in errors.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", default="vae_decode")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        parser.error("this CPU has no bf16 (avx512_bf16 or AMX): OpenVINO would run bf16 in f32")
    xml = args.bundle / f"ov/{args.engine}.b1.xml"
    if not any(op.get_type_name() == "GroupNormalization" for op in core.read_model(str(xml)).get_ordered_ops()):
        parser.error(f"{xml} holds no GroupNormalization op (give an OpenVINO bundle built by this version)")
    engine_check(core, str(xml), args.rounds)
    offset_check(core)


if __name__ == "__main__":
    main()

"""GroupNorm in the convolutions' channels-last layout: does OpenVINO's CPU plugin run it without layout reorders?

A bf16 VAE decoder spends a sixth of its time reordering between the convolutions' channels-last layout and the
planar one GroupNormalization's Reshape -> MVN needs. This builds four residual blocks (GroupNorm -> SiLU -> 3x3
convolution -> add) of a decoder's size twice, with GroupNormalization and with the norm written in channels-last
terms (Transpose -> Reshape to [N, H, W, groups, channels per group] -> MVN over H, W and the group's channels ->
affine -> Transpose back), compiles both in bf16, times them alternated and prints each one's time by node type and
its error against the f32 model.

usage: python scripts/gn-layout-check.py [--channels 256] [--size 128] [--groups 32] [--rounds 8]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import openvino as ov
from openvino import opset13 as ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is a warm-up)")
    channels, size, groups = args.channels, args.size, args.groups
    rng = np.random.default_rng(0)
    gamma = (rng.random(channels) + 0.5).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)

    def native(x: ov.Output) -> ov.Output:
        return ops.group_normalization(x, ops.constant(gamma), ops.constant(beta), groups, 1e-6)

    def channels_last(x: ov.Output) -> ov.Output:
        nhwc = ops.transpose(x, ops.constant(np.array([0, 2, 3, 1], np.int64)))
        grouped_shape = ops.constant(np.array([1, size, size, groups, channels // groups], np.int64))
        grouped = ops.reshape(nhwc, grouped_shape, False)
        normed = ops.mvn(grouped, ops.constant(np.array([1, 2, 4], np.int64)), True, 1e-6, "inside_sqrt")
        flat = ops.reshape(normed, ops.constant(np.array([1, size, size, channels], np.int64)), False)
        affine = ops.add(ops.multiply(flat, ops.constant(gamma.reshape(1, 1, 1, -1))),
                         ops.constant(beta.reshape(1, 1, 1, -1)))
        return ops.transpose(affine, ops.constant(np.array([0, 3, 1, 2], np.int64)))

    def blocks(norm) -> ov.Model:
        x = ops.parameter([1, channels, size, size], np.float32, name="x")
        y = x
        for block in range(4):
            weight = np.random.default_rng(block).standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)
            h = ops.convolution(ops.swish(norm(y)), ops.constant(weight.astype(np.float32)), [1, 1], [1, 1], [1, 1],
                                [1, 1])
            y = ops.add(y, h)
        return ov.Model([y], [x])

    core = ov.Core()
    # Off-centre groups (mean 3 std 2), as a trained decoder's often are.
    x = (rng.standard_normal((1, channels, size, size)) * 2 + 3).astype(np.float32)
    reference = core.compile_model(blocks(native), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": "YES"}
    requests = {name: core.compile_model(blocks(norm), "CPU", config).create_infer_request()
                for name, norm in (("GroupNormalization", native), ("channels-last MVN", channels_last))}
    times: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(args.rounds):
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer({"x": x})
            times[name].append(time.perf_counter() - start)
    for name, request in requests.items():
        error = np.abs(request.get_output_tensor(0).data - reference)
        by_type: Counter = Counter()
        for layer in request.get_profiling_info():
            by_type[layer.node_type] += layer.real_time.total_seconds() * 1e3
        layers = ", ".join(f"{node} {ms:.1f}" for node, ms in by_type.most_common(5))
        print(f"{name}: {np.median(times[name][1:]) * 1e3:.1f} ms (median after the first round); error against f32 "
              f"max {error.max():.4f} mean {error.mean():.5f}; ms by node type: {layers}")


if __name__ == "__main__":
    main()

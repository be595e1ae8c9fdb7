"""GroupNorm as reductions, measured in bf16 (a rewrite tried and not shipped; README, Benchmarks, "Xeon with AMX").

In bf16 OpenVINO's CPU plugin runs convolutions channels-last and each GroupNormalization as Reshape -> MVN on the
planar layout, so every norm of the VAE decoder is wrapped in two layout reorders (a fifth of a bf16 decode on a Xeon
with AMX, per OpenVINO's profile). This rewrites each GroupNormalization of one engine's IR (those over at least
--min-spatial pixels) as per-channel ReduceMean over the spatial axes, a group average of those means (a small
constant MatMul), x - mean, the same for the variance, and a per-channel scale and bias: ops that keep any layout.
Both IRs are compiled in bf16 in this process and alternated (original, rewritten, rewritten, original) after a
warm-up; each is also compared with the original compiled in f32 on the same random inputs.

usage: python scripts/gn-reduce-check.py BUNDLE [--engine vae_decode] [--min-spatial 0] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset12 as ops


def group_average(per_channel: ov.Node, channels: int, groups: int, rank: int) -> ov.Node:
    """(N, C, 1, ...) per-channel values -> each channel's group mean, same shape (a block-diagonal MatMul)."""
    size = channels // groups
    blocks = np.kron(np.eye(groups, dtype=np.float32), np.full((size, size), 1.0 / size, np.float32))
    flat = ops.reshape(per_channel, ops.constant(np.array([0, channels], np.int64)), True)
    mean = ops.matmul(flat, ops.constant(blocks), False, False)
    return ops.reshape(mean, ops.constant(np.array([0, channels] + [1] * (rank - 2), np.int64)), True)


def rewrite(model: ov.Model, min_spatial: int) -> int:
    rewritten = 0
    for norm in [op for op in model.get_ordered_ops() if op.get_type_name() == "GroupNormalization"]:
        x = norm.input_value(0)
        dims = [d.get_length() for d in x.get_partial_shape()]
        if int(np.prod(dims[2:])) < min_spatial:
            continue
        channels, rank, attrs = dims[1], len(dims), norm.get_attributes()
        per_channel_shape = [1, channels] + [1] * (rank - 2)
        scale = norm.input_value(1).get_node().get_data().reshape(per_channel_shape)
        bias = norm.input_value(2).get_node().get_data().reshape(per_channel_shape)
        axes = ops.constant(np.arange(2, rank, dtype=np.int64))
        centred = ops.subtract(x, group_average(ops.reduce_mean(x, axes, True), channels, attrs["num_groups"], rank))
        variance = group_average(ops.reduce_mean(ops.multiply(centred, centred), axes, True), channels,
                                 attrs["num_groups"], rank)
        epsilon = ops.constant(np.float32(attrs["epsilon"]))
        factor = ops.divide(ops.constant(scale), ops.sqrt(ops.add(variance, epsilon)))
        out = ops.add(ops.multiply(centred, factor), ops.constant(bias))
        names = norm.output(0).get_names()
        norm.output(0).replace(out.output(0))
        if names:
            out.output(0).set_names(names)
        rewritten += 1
    model.validate_nodes_and_infer_types()
    return rewritten


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", default="vae_decode")
    parser.add_argument("--min-spatial", type=int, default=0, help="rewrite only norms over at least this many pixels")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        parser.error("this CPU has no bf16 (avx512_bf16 or AMX): OpenVINO would run bf16 in f32")
    xml = str(args.bundle / f"ov/{args.engine}.b1.xml")
    original, rewritten = core.read_model(xml), core.read_model(xml)
    print(f"{args.engine}: {rewrite(rewritten, args.min_spatial)} GroupNormalization ops rewritten as reductions")
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
    for _ in range(args.rounds):
        for side in ("original", "rewritten", "rewritten", "original"):
            start = time.perf_counter()
            requests[side].infer(feeds)
            times[side].append(time.perf_counter() - start)
    ratios = [sum(times["original"][2 * r:2 * r + 2]) / sum(times["rewritten"][2 * r:2 * r + 2])
              for r in range(args.rounds)]
    print(f"  per call: original median {statistics.median(times['original']) * 1e3:.0f} ms, rewritten "
          f"{statistics.median(times['rewritten']) * 1e3:.0f} ms; original / rewritten per round: median "
          f"{statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x")


if __name__ == "__main__":
    main()

"""How much faster int8 convolutions can be than fp32 on this CPU, measured: single convolutions of the UNet's and VAE's
shapes, each compiled by OpenVINO in fp32 and as a FakeQuantize'd pair (u8 activations, per-channel i8 weights, which
the CPU plugin runs as an int8 kernel), alternated after a warm-up. The ceiling an int8 bundle's arithmetic has here.

usage: python scripts/int8-conv-check.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import openvino as ov
import openvino.opset13 as ops

SHAPES = ((256, 256, 128, 3), (512, 512, 64, 3), (1280, 1280, 16, 3), (640, 640, 32, 1))  # in, out, size, kernel


def convolution(cin: int, cout: int, size: int, kernel: int, int8: bool, rng: np.random.Generator) -> ov.Model:
    x = ops.parameter([1, cin, size, size], np.float32, name="x")
    weights = (rng.standard_normal((cout, cin, kernel, kernel)) * 0.05).astype(np.float32)
    w: object = ops.constant(weights)
    if int8:
        low, high = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
        x_in: object = ops.fake_quantize(x, low, high, low, high, 256)
        bound = np.abs(weights).reshape(cout, -1).max(1).reshape(cout, 1, 1, 1)
        low, high = ops.constant(-bound), ops.constant(bound)
        w = ops.fake_quantize(w, low, high, low, high, 255)
    else:
        x_in = x
    pad = [kernel // 2] * 2
    return ov.Model([ops.relu(ops.convolution(x_in, w, [1, 1], pad, pad, [1, 1]))], [x])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    core, rng = ov.Core(), np.random.default_rng(0)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    for cin, cout, size, kernel in SHAPES:
        x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
        requests, runs_at = {}, {}
        for side in ("fp32", "int8"):
            compiled = core.compile_model(convolution(cin, cout, size, kernel, side == "int8", rng), "CPU", config)
            runs_at[side] = [op.get_rt_info()["runtimePrecision"].astype(str)
                             for op in compiled.get_runtime_model().get_ordered_ops()
                             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
            requests[side] = compiled.create_infer_request()
            requests[side].infer({0: x})  # warm-up
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            for side in ("fp32", "int8", "int8", "fp32"):
                start = time.perf_counter()
                requests[side].infer({0: x})
                times[side].append(time.perf_counter() - start)
        fp32, int8 = (statistics.median(times[side]) * 1e3 for side in ("fp32", "int8"))
        print(f"conv {cin}->{cout} {kernel}x{kernel} at {size}x{size}: fp32 {fp32:.1f} ms, int8 {int8:.1f} ms "
              f"(runs at {runs_at['int8']}), {fp32 / int8:.2f}x")


if __name__ == "__main__":
    main()

"""GroupNorm as reductions against GroupNormalization, measured in bf16 (`group_norms_as_reductions`, which bf16 and
int8 bundles apply to the VAE's engines; README, Benchmarks, "Xeon with AMX").

In bf16 OpenVINO's CPU plugin runs convolutions channels-last and each GroupNormalization as Reshape -> MVN on the
planar layout, so every norm of the VAE decoder is wrapped in two layout reorders (a fifth of a bf16 decode on a
Xeon with AMX, per OpenVINO's profile). The rewrite (lcmtrt/engines/openvino_fusion.py) computes per-channel means
of x and x*x over the spatial axes, their group averages, and x * a + b: ops that keep any layout. This reads one
engine's IR from a bundle whose IR still holds GroupNormalization ops (an fp32 bundle), rewrites a copy, compiles
both in bf16 in this process and alternates them (original, rewritten, rewritten, original) after a warm-up; each is
also compared with the original compiled in f32 on the same random inputs.

usage: python scripts/gn-reduce-check.py FP32_BUNDLE [--engine vae_decode] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov

from lcmtrt.engines.openvino_fusion import group_norms_as_reductions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", default="vae_decode")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        parser.error("this CPU has no bf16 (avx512_bf16 or AMX): OpenVINO would run bf16 in f32")
    xml = str(args.bundle / f"ov/{args.engine}.b1.xml")
    original, rewritten = core.read_model(xml), core.read_model(xml)
    count = group_norms_as_reductions(rewritten)
    if not count:
        parser.error(f"{xml} holds no GroupNormalization op (a bf16 or int8 bundle's VAE is rewritten already: "
                     "give the fp32 bundle)")
    print(f"{args.engine}: {count} GroupNormalization ops rewritten as reductions")
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

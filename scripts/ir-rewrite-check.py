"""An OpenVINO IR rewrite measured (engines/openvino_fusion.py: GroupNorm as one op, upsampling convolutions
folded): op counts of two OpenVINO bundles' IR of the same model (one converted before the rewrite, one after), then
each engine's time per call, both IRs compiled at one inference precision (fp32, or bf16 where the CPU has it) in
this one process on the same inputs, alternated (before, after, after, before) after a warm-up; the ratio is taken
per round, then its median.

usage: python scripts/ir-rewrite-check.py BEFORE_BUNDLE AFTER_BUNDLE [--rounds N] [--threads N] [--engines E ...]
       [--precision f32|bf16]
(--threads 1 measures the arithmetic where other jobs share the cores)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov

KINDS = ("GroupNormalization", "MVN", "Reshape", "ShapeOf", "Interpolate", "Convolution", "DepthToSpace")


def counts(xml: Path) -> Counter:
    return Counter(op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ordered_ops())


def inputs(model: ov.CompiledModel) -> dict[str, np.ndarray]:
    """Deterministic inputs of each input's static shape and type (values in [0, 1): any value times the same)."""
    rng = np.random.default_rng(0)
    return {port.get_any_name(): rng.random(list(port.get_shape())).astype(port.get_element_type().to_dtype())
            for port in model.inputs}


def timed(request: ov.InferRequest, feeds: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    request.infer(feeds)
    return time.perf_counter() - start


def compare(engine: str, before: Path, after: Path, rounds: int, threads: int, precision: str) -> None:
    xmls = {"before": before / f"ov/{engine}.b1.xml", "after": after / f"ov/{engine}.b1.xml"}
    ops = {side: counts(xml) for side, xml in xmls.items()}
    print(f"{engine}: " + "; ".join(f"{k} {ops['before'][k]} -> {ops['after'][k]}" for k in KINDS)
          + f"; all ops {sum(ops['before'].values())} -> {sum(ops['after'].values())}")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = {side: core.compile_model(str(xml), "CPU", config) for side, xml in xmls.items()}
    requests = {side: model.create_infer_request() for side, model in compiled.items()}
    feeds = inputs(compiled["before"])
    outputs = {side: [np.copy(t.data) for t in request.infer(feeds).values()] for side, request in requests.items()}
    difference = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(*outputs.values()))
    for request in requests.values():  # warm-up: one more call each
        timed(request, feeds)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(rounds):
        for side in ("before", "after", "after", "before"):
            times[side].append(timed(requests[side], feeds))
    median = {side: statistics.median(t) for side, t in times.items()}
    # each round's before/after ratio: drift of a shared machine within a round falls on both sides alike
    ratios = sorted(sum(times["before"][2 * r:2 * r + 2]) / sum(times["after"][2 * r:2 * r + 2]) for r in range(rounds))
    print(f"  per call, {2 * rounds} each: before median {median['before'] * 1e3:.0f} ms (min "
          f"{min(times['before']) * 1e3:.0f}), after median {median['after'] * 1e3:.0f} ms (min "
          f"{min(times['after']) * 1e3:.0f}); before / after per round: median {statistics.median(ratios):.3f}x, "
          f"range {ratios[0]:.3f}-{ratios[-1]:.3f}x; max |after - before| over the outputs {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="OpenVINO threads per model (0: its default)")
    parser.add_argument("--engines", nargs="+", default=["denoise", "vae_decode"])
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32", help="inference precision of both")
    args = parser.parse_args()
    if args.precision == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        parser.error("this CPU has no bf16 (avx512_bf16 or AMX): OpenVINO would run --precision bf16 in f32")
    for engine in args.engines:
        compare(engine, args.before, args.after, args.rounds, args.threads, args.precision)


if __name__ == "__main__":
    main()

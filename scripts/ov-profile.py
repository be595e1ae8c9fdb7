"""OpenVINO's per-layer profile of one engine of a bundle: where a call's time goes, by runtime node type and kernel.

Compiles `ov/<engine>.b1.xml` with PERF_COUNT at the given inference precision (a bf16 bundle's `bf16`; `default`
sets no hint, as an int8 bundle runs), runs it on deterministic random inputs (--warmup calls, then --calls timed),
and prints the last call's per-node times summed by (node type, kernel), then the slowest layout reorders. With
--consumers INPUT it also sums the nodes that read that input directly (e.g. `prompt_embeds`: the cross-attention
key and value projections, which a step recomputes from the same text embeddings).

usage: python scripts/ov-profile.py BUNDLE [--engine denoise] [--precision bf16|f32|default] [--calls 3] [--top 20]
                                           [--consumers INPUT]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", default="denoise")
    parser.add_argument("--precision", choices=["bf16", "f32", "default"], default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="how many (node type, kernel) rows to print")
    parser.add_argument("--consumers", metavar="INPUT", help="also sum the time of the nodes reading this input")
    args = parser.parse_args()
    xml = args.bundle / f"ov/{args.engine}.b1.xml"
    if not xml.is_file():
        parser.error(f"{xml} does not exist (an OpenVINO bundle built at batch 1?)")
    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES",
              **({} if args.precision == "default" else {"INFERENCE_PRECISION_HINT": args.precision})}
    core = ov.Core()
    model = core.read_model(str(xml))
    readers = _readers(model, args.consumers) if args.consumers else set()
    compiled = core.compile_model(model, "CPU", config)
    rng = np.random.default_rng(0)
    feeds = {port.get_any_name(): rng.random(list(port.get_shape())).astype(port.get_element_type().to_dtype())
             for port in compiled.inputs}
    request = compiled.create_infer_request()
    for _ in range(args.warmup):
        request.infer(feeds)
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - start)
    layers = request.get_profiling_info()
    total: Counter = Counter()
    count: Counter = Counter()
    for layer in layers:
        key = (layer.node_type, layer.exec_type)
        total[key] += layer.real_time.total_seconds() * 1e3
        count[key] += 1
    print(f"{args.engine} ({args.precision}): call median {statistics.median(times) * 1e3:.1f} ms over {args.calls}; "
          f"layers of the last call sum to {sum(total.values()):.1f} ms")
    for (node_type, kernel), ms in total.most_common(args.top):
        print(f"  {ms:8.1f} ms  {count[node_type, kernel]:4d} x  {node_type:<32} {kernel}")
    reorders = sorted((layer for layer in layers if layer.node_type == "Reorder"),
                      key=lambda layer: -layer.real_time.total_seconds())
    print(f"  reorders: {len(reorders)}, slowest:")
    for layer in reorders[:5]:
        print(f"  {layer.real_time.total_seconds() * 1e3:8.1f} ms  {layer.node_name}")
    if readers:
        # A runtime node keeps the name of the op it came from; an input conversion is named after its reader.
        hits = [layer for layer in layers if any(name in layer.node_name for name in readers)]
        ms = sum(layer.real_time.total_seconds() for layer in hits) * 1e3
        print(f"  readers of {args.consumers}: {len(readers)} ops, {len(hits)} runtime nodes, {ms:.1f} ms "
              f"({ms / sum(total.values()):.1%} of the call)")


def _readers(model: ov.Model, name: str) -> set[str]:
    """Friendly names of the ops (other than shape reads) that take the model input `name` directly."""
    inputs = [param for param in model.get_parameters() if name in param.output(0).get_names()]
    if not inputs:
        names = ", ".join(param.get_friendly_name() for param in model.get_parameters())
        raise SystemExit(f"no input {name!r}; inputs: {names}")
    return {target.get_node().get_friendly_name() for target in inputs[0].output(0).get_target_inputs()
            if target.get_node().get_type_name() != "ShapeOf"}


if __name__ == "__main__":
    main()

"""Graph rewrites that make each row's result independent of the batch it runs in.

A served request must give the same bits alone or merged with others. ONNX Runtime's CPU Sin and Cos run whole SIMD
packets through a vectorised approximation and the leftover tail through the C library, which rounds differently:
with 2 values per row (the tiny models' time embedding) a batch of 1 is all tail and a batch of 2 all packets, so
the same row came out 1 ulp apart. Padding the last axis of every such input to a multiple of the widest packet
(16 fp32 lanes, AVX-512) puts every element on the vector path for any batch size; the padding is sliced off after.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

PACKET = 16  # fp32 lanes of AVX-512, a multiple of AVX2's 8 and NEON's 4
PACKET_OPS = ("Sin", "Cos")  # element-wise ops whose CPU kernels round a packet's tail differently
CONSTANTS = {"minus_one": [-1], "zero": [0], "one": [1], "packet": [PACKET], "zero_zero_zero": [0, 0, 0]}


def pad_to_packets(model: Any) -> int:
    """Rewrite each Sin/Cos `op(x)` as `Reshape(Slice(op(Pad(Reshape(x, [-1, L])))), shape(x))`, padding the last
    axis L up to a multiple of PACKET (a scalar is one row of L = 1). L is read in the graph (the exporter leaves
    the time embedding's shapes unknown to ONNX shape inference); an input shared by Sin and Cos is padded once per
    graph, and the extra nodes cost a few scalar ops. Subgraphs (If branches, Loop and Scan bodies) are rewritten
    too; the int constants are one set of main-graph initializers, which subgraphs see from their outer scope.
    Returns how many nodes were rewritten."""
    from onnx import numpy_helper

    constants = {k: f"packet/{k}" for k in CONSTANTS}
    rewritten = _pad_graph(model.graph, constants, itertools.count())
    if rewritten:
        model.graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), constants[k])
                                       for k, v in CONSTANTS.items())
        log.debug("padded %d Sin/Cos inputs to whole %d-lane packets", rewritten, PACKET)
    return rewritten


def _subgraphs(node: Any) -> Iterator[Any]:
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def _pad_graph(graph: Any, c: dict[str, str], numbers: Iterator[int]) -> int:
    """Rewrite `graph`'s Sin/Cos nodes after those of its subgraphs (whose nodes are copied with their parent's);
    every graph gets its own number in the names it adds, so nothing shadows a name of an enclosing graph."""
    from onnx import helper

    scope = f"packet{next(numbers) or ''}"  # the main graph keeps the names it always had: x/packet/...
    rewritten = sum(_pad_graph(g, c, numbers) for node in graph.node for g in _subgraphs(node))
    nodes, padded, here = [], {}, 0  # padded: input -> (its shape, its last dim, the padded 2-D tensor)
    for node in graph.node:
        if node.op_type not in PACKET_OPS:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in padded:
            padded[x], added = _padded_rows(x, f"{x}/{scope}", c)
            nodes += added
        shape, last, flat = padded[x]
        computed, cut = f"{node.output[0]}/{scope}/computed", f"{node.output[0]}/{scope}/cut"
        nodes += [
            helper.make_node(node.op_type, [flat], [computed], name=node.name),
            helper.make_node("Slice", [computed, c["zero"], last, c["one"]], [cut], name=cut),
            helper.make_node("Reshape", [cut, shape], list(node.output), name=f"{node.output[0]}/{scope}/restore"),
        ]
        here += 1
    if here:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten + here


def _padded_rows(x: str, prefix: str, c: dict[str, str]) -> tuple[tuple[str, str, str], list[Any]]:
    """Nodes that view `x` as rows of its last axis L (a scalar as one row of 1) padded to whole packets:
    ((x's shape, [L], the padded [rows, L + extra] tensor), the nodes)."""
    from onnx import helper

    t = {k: f"{prefix}/{k}" for k in ("shape", "tail", "tail_one", "last", "rows", "flat", "rem", "short", "extra",
                                      "pads", "padded")}
    return (t["shape"], t["last"], t["padded"]), [
        helper.make_node("Shape", [x], [t["shape"]], name=t["shape"]),
        # L: the last dimension, or 1 for a scalar (whose Shape(start=-1) is empty): first of [dims[-1:]..., 1]
        helper.make_node("Shape", [x], [t["tail"]], start=-1, name=t["tail"]),
        helper.make_node("Concat", [t["tail"], c["one"]], [t["tail_one"]], axis=0, name=t["tail_one"]),
        helper.make_node("Slice", [t["tail_one"], c["zero"], c["one"]], [t["last"]], name=t["last"]),
        helper.make_node("Concat", [c["minus_one"], t["last"]], [t["rows"]], axis=0, name=t["rows"]),
        helper.make_node("Reshape", [x, t["rows"]], [t["flat"]], name=t["flat"]),
        # extra = (PACKET - L mod PACKET) mod PACKET; pads = [0, 0, 0, extra] for the 2-D [rows, L]
        helper.make_node("Mod", [t["last"], c["packet"]], [t["rem"]], name=t["rem"]),
        helper.make_node("Sub", [c["packet"], t["rem"]], [t["short"]], name=t["short"]),
        helper.make_node("Mod", [t["short"], c["packet"]], [t["extra"]], name=t["extra"]),
        helper.make_node("Concat", [c["zero_zero_zero"], t["extra"]], [t["pads"]], axis=0, name=t["pads"]),
        helper.make_node("Pad", [t["flat"], t["pads"]], [t["padded"]], name=t["padded"]),
    ]

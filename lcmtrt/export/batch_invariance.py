"""Graph rewrites that make each row's result independent of the batch it runs in.

A served request must give the same bits alone or merged with others. ONNX Runtime's CPU Sin and Cos run whole SIMD
packets through a vectorised approximation and the leftover tail through the C library, which rounds differently:
with 2 values per row (the tiny models' time embedding) a batch of 1 is all tail and a batch of 2 all packets, so
the same row came out 1 ulp apart. Padding the last axis of every such input to a multiple of the widest packet
(16 fp32 lanes, AVX-512) puts every element on the vector path for any batch size; the padding is sliced off after.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

PACKET = 16  # fp32 lanes of AVX-512, a multiple of AVX2's 8 and NEON's 4
PACKET_OPS = ("Sin", "Cos")  # element-wise ops whose CPU kernels round a packet's tail differently


def pad_to_packets(model) -> int:
    """Rewrite each Sin/Cos `op(x)` as `Reshape(Slice(op(Pad(Reshape(x, [-1, L])))), shape(x))`, padding the last
    axis L up to a multiple of PACKET. L is read in the graph (the exporter leaves the time embedding's shapes
    unknown to ONNX shape inference); an input shared by Sin and Cos is padded once, and the extra nodes cost a few
    scalar ops. Returns how many nodes were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {"minus_one": [-1], "zero": [0], "one": [1], "packet": [PACKET], "zero_zero_zero": [0, 0, 0]}
    c = {k: f"packet/{k}" for k in constants}
    nodes, padded, rewritten = [], {}, 0  # padded: input -> (its shape, its last dim, the padded 2-D tensor)
    for node in graph.node:
        if node.op_type not in PACKET_OPS:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in padded:
            t = {k: f"{x}/packet/{k}" for k in ("shape", "last", "rows", "flat", "rem", "short", "extra", "pads",
                                                "padded")}
            nodes += [
                helper.make_node("Shape", [x], [t["shape"]], name=t["shape"]),
                helper.make_node("Shape", [x], [t["last"]], start=-1, name=t["last"]),
                helper.make_node("Concat", [c["minus_one"], t["last"]], [t["rows"]], axis=0, name=t["rows"]),
                helper.make_node("Reshape", [x, t["rows"]], [t["flat"]], name=t["flat"]),
                # extra = (PACKET - L mod PACKET) mod PACKET; pads = [0, 0, 0, extra] for the 2-D [rows, L]
                helper.make_node("Mod", [t["last"], c["packet"]], [t["rem"]], name=t["rem"]),
                helper.make_node("Sub", [c["packet"], t["rem"]], [t["short"]], name=t["short"]),
                helper.make_node("Mod", [t["short"], c["packet"]], [t["extra"]], name=t["extra"]),
                helper.make_node("Concat", [c["zero_zero_zero"], t["extra"]], [t["pads"]], axis=0, name=t["pads"]),
                helper.make_node("Pad", [t["flat"], t["pads"]], [t["padded"]], name=t["padded"]),
            ]
            padded[x] = (t["shape"], t["last"], t["padded"])
        shape, last, flat = padded[x]
        computed, cut = f"{node.output[0]}/packet/computed", f"{node.output[0]}/packet/cut"
        nodes += [
            helper.make_node(node.op_type, [flat], [computed], name=node.name),
            helper.make_node("Slice", [computed, c["zero"], last, c["one"]], [cut], name=cut),
            helper.make_node("Reshape", [cut, shape], list(node.output), name=f"{node.output[0]}/packet/restore"),
        ]
        rewritten += 1
    if rewritten:
        graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), c[k])
                                 for k, v in constants.items())
        del graph.node[:]
        graph.node.extend(nodes)
        log.debug("padded %d Sin/Cos inputs to whole %d-lane packets", rewritten, PACKET)
    return rewritten

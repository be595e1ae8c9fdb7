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
    unknown to ONNX shape inference); the extra nodes cost a few scalar ops. Returns how many nodes were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {"minus_one": [-1], "zero": [0], "packet": [PACKET], "zero_zero_zero": [0, 0, 0], "one": [1]}
    nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type not in PACKET_OPS:
            nodes.append(node)
            continue
        tag = f"{node.name or node.output[0]}/packet"
        name = {k: f"{tag}/{k}" for k in ("shape", "last", "rows", "flat", "rem", "short", "extra", "pads",
                                          "padded", "computed", "cut")}
        graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), f"{tag}/{k}")
                                 for k, v in constants.items())
        c = {k: f"{tag}/{k}" for k in constants}
        nodes += [
            helper.make_node("Shape", [node.input[0]], [name["shape"]], name=f"{tag}/Shape"),
            helper.make_node("Shape", [node.input[0]], [name["last"]], start=-1, name=f"{tag}/Last"),
            helper.make_node("Concat", [c["minus_one"], name["last"]], [name["rows"]], axis=0, name=f"{tag}/Rows"),
            helper.make_node("Reshape", [node.input[0], name["rows"]], [name["flat"]], name=f"{tag}/Flatten"),
            # extra = (PACKET - L mod PACKET) mod PACKET; pads = [0, 0, 0, extra] for the 2-D [rows, L]
            helper.make_node("Mod", [name["last"], c["packet"]], [name["rem"]], name=f"{tag}/Rem"),
            helper.make_node("Sub", [c["packet"], name["rem"]], [name["short"]], name=f"{tag}/Short"),
            helper.make_node("Mod", [name["short"], c["packet"]], [name["extra"]], name=f"{tag}/Extra"),
            helper.make_node("Concat", [c["zero_zero_zero"], name["extra"]], [name["pads"]], axis=0,
                             name=f"{tag}/Pads"),
            helper.make_node("Pad", [name["flat"], name["pads"]], [name["padded"]], name=f"{tag}/Pad"),
            helper.make_node(node.op_type, [name["padded"]], [name["computed"]], name=node.name),
            helper.make_node("Slice", [name["computed"], c["zero"], name["last"], c["one"]], [name["cut"]],
                             name=f"{tag}/Slice"),
            helper.make_node("Reshape", [name["cut"], name["shape"]], list(node.output), name=f"{tag}/Restore"),
        ]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten:
        log.debug("padded %d Sin/Cos inputs to whole %d-lane packets", rewritten, PACKET)
    return rewritten

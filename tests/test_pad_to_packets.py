"""export/batch_invariance.py's rewrite on small hand-built ONNX graphs, run with ONNX Runtime before and after:
the rewritten graph is valid (checker with full shape inference), computes the same values (within the 1 ulp that
separates ONNX Runtime's vector Sin/Cos from its scalar tail), and gives a row the same bits alone and in a batch,
for Sin/Cos at the top level, on scalars and vectors, and inside If branches, Loop and Scan bodies."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lcmtrt.export.batch_invariance import PACKET, pad_to_packets

ROWS = 24  # not a whole number of packets of 2-value rows on any ISA: 48 values = 3 AVX-512 packets, tail-free
# alone, 2 values per row are all tail; in a batch of 24, all packets: the unrewritten graph differs by 1 ulp


ROWS_OF_L = ["n", "l"]  # shapes as the exporter leaves them: symbolic


def value(name: str, dtype: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, ROWS_OF_L if shape is None else shape)


def model(nodes: list, inputs: list, outputs: list, initializers: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # what the ONNX Runtime here reads
    return m


def rewritten(m: onnx.ModelProto, expected: int) -> onnx.ModelProto:
    m = copy.deepcopy(m)
    assert pad_to_packets(m) == expected
    m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


def run(m: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def angles(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * 500, dtype=np.float32)


def assert_same_values(before: onnx.ModelProto, after: onnx.ModelProto, **feeds: np.ndarray) -> None:
    for old, new in zip(run(before, **feeds), run(after, **feeds)):
        assert new.shape == old.shape and new.dtype == old.dtype
        np.testing.assert_array_max_ulp(new, old, maxulp=1)


def assert_rows_batch_invariant(m: onnx.ModelProto, extra: dict | None = None) -> None:
    """Every output row computed in a batch of ROWS equals the same row computed alone, bit for bit."""
    x = angles((ROWS, 2))
    batch = run(m, x=x, **(extra or {}))
    for i in range(ROWS):
        alone = run(m, x=x[i:i + 1], **(extra or {}))
        for b, a in zip(batch, alone):
            np.testing.assert_array_equal(b[i], a[0], err_msg=f"row {i}")


def padded_inputs(graph: onnx.GraphProto) -> list[str]:
    """The inputs of `graph`'s own Sin/Cos nodes that are not produced by the rewrite's Pad."""
    pads = {n.output[0] for n in graph.node if n.op_type == "Pad"}
    return [n.input[0] for n in graph.node if n.op_type in ("Sin", "Cos") and n.input[0] not in pads]


# ---- top level -----------------------------------------------------------------------------------------------------

def test_shared_input_of_sin_and_cos() -> None:
    m = model([helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Cos", ["x"], ["c"])], [value("x")],
              [value("s"), value("c")])
    after = rewritten(m, 2)
    assert [n.op_type for n in after.graph.node].count("Pad") == 1  # padded once for both
    assert_same_values(m, after, x=angles((5, 3)))
    assert_rows_batch_invariant(after)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (PACKET,), (2, 3, 17)])
def test_any_rank_keeps_its_shape_and_values(shape: tuple[int, ...]) -> None:
    dims = [f"d{i}" for i in range(len(shape))]
    m = model([helper.make_node("Sin", ["x"], ["y"])], [value("x", shape=dims)], [value("y", shape=dims)])
    after = rewritten(m, 1)
    x = angles(shape)
    (y,) = run(after, x=x)
    assert y.shape == shape
    assert_same_values(m, after, x=x)


def test_a_scalar_becomes_one_padded_row() -> None:
    m = model([helper.make_node("Cos", ["x"], ["y"])], [value("x", shape=[])], [value("y", shape=[])])
    after = rewritten(m, 1)
    pad = next(n for n in after.graph.node if n.op_type == "Pad")
    after.graph.output.append(value(pad.output[0], shape=["rows", "lanes"]))
    y, padded = run(after, x=np.array(0.25, np.float32))
    assert y.shape == () and padded.shape == (1, PACKET)  # one row of 1 value, padded by 15
    np.testing.assert_array_max_ulp(y, np.cos(np.float32(0.25)), maxulp=1)


# ---- subgraphs -----------------------------------------------------------------------------------------------------

def branch(op: str, name: str) -> onnx.GraphProto:
    """An If branch computing op(x) of the enclosing graph's x."""
    return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [], [value(f"{name}_y")])


def test_if_branches() -> None:
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("Sin", "then"), else_branch=branch("Cos", "else"))
    m = model([node], [value("x"), value("cond", TensorProto.BOOL, [])], [value("y")])
    after = rewritten(m, 2)
    for g in (after.graph.node[-1].attribute[0].g, after.graph.node[-1].attribute[1].g):
        assert padded_inputs(g) == [] and any(n.op_type == "Pad" for n in g.node)
    for cond in (True, False):
        assert_same_values(m, after, x=angles((5, 2)), cond=np.array(cond))
        assert_rows_batch_invariant(after, {"cond": np.array(cond)})


def loop_model(body_nodes: list, trips: int = 2) -> onnx.ModelProto:
    """y = the loop-carried v after `trips` iterations of body_nodes (v -> v_out), v starting as x."""
    body = helper.make_graph(body_nodes + [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []), value("v")],
                             [value("cond_out", TensorProto.BOOL, []), value("v_out")])
    trip = helper.make_tensor("trips", TensorProto.INT64, [], [trips])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)
    return model([loop], [value("x")], [value("y")], (trip,))


def test_loop_body() -> None:
    m = loop_model([helper.make_node("Sin", ["v"], ["w"]), helper.make_node("Mul", ["w", "x"], ["v_out"])])
    after = rewritten(m, 1)
    assert padded_inputs(after.graph.node[0].attribute[0].g) == []
    assert_same_values(m, after, x=angles((3, 2)))
    assert_rows_batch_invariant(after)


def test_scan_body() -> None:
    body = helper.make_graph([helper.make_node("Cos", ["row"], ["out"])], "scan", [value("row", shape=["l"])],
                             [value("out", shape=["l"])])
    scan = helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)
    m = model([scan], [value("x")], [value("y")])
    after = rewritten(m, 1)
    assert padded_inputs(after.graph.node[0].attribute[0].g) == []
    assert_same_values(m, after, x=angles((4, 3)))
    assert_rows_batch_invariant(after)


def test_nested_subgraphs_and_the_same_input_at_every_level() -> None:
    """Sin(x) at the top, inside a Loop body, and inside an If inside that body: each level pads x itself, under
    names of its own (a subgraph may not redefine a name of an enclosing graph)."""
    inner = helper.make_node("If", ["cond_in"], ["z"], then_branch=branch("Sin", "then"),
                             else_branch=branch("Cos", "else"))
    m = loop_model([inner, helper.make_node("Sin", ["x"], ["w"]), helper.make_node("Add", ["z", "w"], ["u"]),
                    helper.make_node("Add", ["u", "v"], ["v_out"])])
    m.graph.node.append(helper.make_node("Sin", ["x"], ["top"]))
    m.graph.output.append(value("top"))
    after = rewritten(m, 4)
    names = [o for g in _graphs(after.graph) for n in g.node for o in n.output]
    assert len(names) == len(set(names))
    assert_same_values(m, after, x=angles((3, 2)))
    assert_rows_batch_invariant(after)


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found += _graphs(attribute.g)
    return found


# ---- the export: one rewrite-then-check for graphs that fit in memory and for the >2 GB path ------------------------

def weighted_sin() -> onnx.ModelProto:
    """y = Sin(x) * w, with w an initializer (what the >2 GB path moves to the external-data file)."""
    w = onnx.numpy_helper.from_array(np.array([0.5, -2.0], np.float32), "w")  # raw data, as torch writes it
    return model([helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Mul", ["s", "w"], ["y"])], [value("x")],
                 [value("y")], (w,))


@pytest.mark.parametrize("external", [False, True], ids=["in-memory", "external-data"])
def test_export_rewrites_both_paths(tmp_path, external: bool) -> None:
    from lcmtrt.export.onnx_export import _finalize

    m = weighted_sin()
    onnx.save(m, str(tmp_path / "raw.onnx"))
    files = _finalize(tmp_path / "raw.onnx", tmp_path / "g.onnx", external=external)  # external: the >2 GB path
    assert [f.name for f in files] == ["g.onnx", "g.onnx.data"][: 1 + external]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw.onnx", *(f.name for f in files)])
    saved = onnx.load(str(files[0]))
    assert [n.op_type for n in saved.graph.node].count("Pad") == 1
    assert_same_values(m, saved, x=angles((3, 2)))
    assert_rows_batch_invariant(saved)


@pytest.mark.parametrize("external", [False, True], ids=["in-memory", "external-data"])
def test_export_checks_the_graph_after_the_rewrite(tmp_path, monkeypatch, external: bool) -> None:
    """A rewrite that left an invalid graph is caught by the check on both paths, and nothing is saved as g.onnx
    (the >2 GB path used to check before the rewrite only)."""
    from lcmtrt.export import onnx_export

    def broken_rewrite(model: onnx.ModelProto) -> int:
        rewritten = pad_to_packets(model)
        model.graph.node.append(helper.make_node("Identity", ["defined_nowhere"], ["dangling"]))
        return rewritten

    monkeypatch.setattr(onnx_export, "pad_to_packets", broken_rewrite)
    onnx.save(weighted_sin(), str(tmp_path / "raw.onnx"))
    invalid = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    with pytest.raises(invalid, match="defined_nowhere|Identity"):
        onnx_export._finalize(tmp_path / "raw.onnx", tmp_path / "g.onnx", external=external)
    assert not (tmp_path / "g.onnx").exists() and not (tmp_path / "g.onnx.data").exists()

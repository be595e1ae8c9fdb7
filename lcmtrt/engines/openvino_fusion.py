"""OpenVINO IR rewrites applied when an ONNX graph is converted, each the same arithmetic in fewer or cheaper ops.

GroupNorm. The exporter writes `nn.GroupNorm` as Reshape(x, [0, G, -1]) -> InstanceNormalization (unit scale, zero
bias) -> Reshape(., Shape(x)) -> Mul(weight) -> Add(bias). ONNX Runtime and TensorRT run that form natively, so the
ONNX graphs keep it (ONNX's GroupNormalization-18 has no ONNX Runtime CPU kernel: it runs as its slower function
body). OpenVINO converts it to Reshape -> MVN -> Reshape(ShapeOf) -> Multiply -> Add, where optimum-intel's IR
(traced from torch) holds one GroupNormalization; `fuse_group_norms` gives lcmtrt's IR the same op. Only exact
matches are rewritten: the normalisation is the same arithmetic (mean and variance over each group of C/G channels
times the spatial axes, epsilon inside the square root), so anything else is left as it was.

Upsampling. diffusers' Upsample2D (every UNet and VAE decoder up block but the last) is a nearest 2x Interpolate
followed by a 3x3 convolution, which spends 9 products per output pixel on a map whose pixels come in 2x2 blocks of
equal values. `fold_upsample_convs` writes it as four 2x2 convolutions over the map before upsampling, one per output
phase (row and column parity), each with the 3x3 kernel's taps that land on the same source pixel summed, and a
DepthToSpace that interleaves their outputs: 4 products per output pixel instead of 9, the same sums in another
order (README, Benchmarks: sd15-random 256x256 on 2 Zen 3 cores, VAE decode 1.23x, one denoise step 1.08x).

GEGLU, for bf16 and int8 bundles only (fp32 results change in the last bits, and an fp32 step gains nothing: 0.99x).
A transformer block's feed-forward projects to 2x its width and chunks the result into a value and a gate; OpenVINO's
CPU plugin runs that chunk as a reference VariadicSplit (bf16: 2.7% of a denoise step on a Xeon with AMX).
`split_geglu_projections` writes the projection as two matrix products, one per half of its columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fuse_group_norms(model: Any) -> int:
    """Rewrite every exporter GroupNorm chain in the OpenVINO `model`, reshaped to static shapes, in place (the
    per-channel Multiply and Add after it folded in as the op's scale and bias); returns how many were rewritten."""
    import openvino.opset12 as ops

    fused = 0
    for mvn in [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]:
        match = _group_norm_chain(mvn)
        if match is None:
            continue
        x, groups, epsilon, last = match
        channels = x.get_partial_shape()[1].get_length()
        dtype = x.get_element_type().to_dtype()
        scale, bias = np.ones(channels, dtype), np.zeros(channels, dtype)
        last, scale, bias = _fold_affine(last, scale, bias)
        norm = ops.group_normalization(x, ops.constant(scale), ops.constant(bias), groups, epsilon)
        norm.set_friendly_name(last.get_node().get_friendly_name())
        names = last.get_names()
        last.replace(norm.output(0))
        if names:  # a graph output keeps its tensor name
            norm.output(0).set_names(names)
        fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return fused


def _constant(output: Any) -> np.ndarray | None:
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _single_consumer(output: Any) -> Any | None:
    """The one node that reads `output`, or None when none or several do."""
    targets = list(output.get_target_inputs())
    return targets[0].get_node() if len(targets) == 1 else None


def _group_norm_chain(mvn: Any) -> tuple[Any, int, float, Any] | None:
    """(x, groups, epsilon, the chain's last output) when `mvn` is the middle of Reshape(x, [0, G, -1]) -> MVN over
    the last axis -> Reshape back to x's shape, x's shape static with a channel count divisible by G; else None."""
    attributes = mvn.get_attributes()
    scaled = attributes.get("normalize_variance") and str(attributes.get("eps_mode")).upper() == "INSIDE_SQRT"
    if mvn.get_input_size() != 2 or not scaled:  # MVN-2 (no axes input) or another normalisation
        return None
    axes = _constant(mvn.input_value(1))
    grouped = mvn.input_value(0).get_node()
    if axes is None or axes.tolist() not in ([2], [-1]) or grouped.get_type_name() != "Reshape":
        return None
    target = _constant(grouped.input_value(1))
    if target is None or len(target) != 3 or target[0] != 0 or target[2] != -1 or not grouped.get_attributes().get(
            "special_zero") or _single_consumer(grouped.output(0)) is None:
        return None
    x, groups = grouped.input_value(0), int(target[1])
    shape = x.get_partial_shape()
    if not shape.is_static or len(shape) < 2 or groups <= 0 or shape[1].get_length() % groups:
        return None
    restore = _single_consumer(mvn.output(0))
    # a row-major Reshape of [N, G, -1] back to x's own static shape undoes the first one, whatever computed its
    # target (OpenVINO may take it from another tensor of equal shape)
    if restore is None or restore.get_type_name() != "Reshape" or restore.get_output_partial_shape(0) != shape:
        return None
    return x, groups, float(attributes["eps"]), restore.output(0)


def _per_channel(output: Any, other: Any, channels: int) -> np.ndarray | None:
    """The [C] values of `other` when it is a constant that broadcasts along the channel axis of `output` only."""
    value = _constant(other)
    rank = len(output.get_partial_shape())
    if value is None or value.ndim > rank or value.size != channels:
        return None
    padded = (1,) * (rank - value.ndim) + value.shape  # C values with C on axis 1: every other axis is 1
    return value.reshape(-1) if padded[1] == channels else None


def _fold_affine(last: Any, scale: np.ndarray, bias: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """Fold the per-channel Multiply, then Add, that follow the chain (the GroupNorm's weight and bias) into the
    op's scale and bias: (new last output, scale, bias)."""
    for kind in ("Multiply", "Add"):
        node = _single_consumer(last)
        if node is None or node.get_type_name() != kind:
            continue
        other = node.input_value(1) if node.input_value(0) == last else node.input_value(0)
        values = _per_channel(last, other, scale.size)
        if values is None or node.get_output_partial_shape(0) != last.get_partial_shape():
            return last, scale, bias
        values = values.astype(scale.dtype)
        if kind == "Multiply":
            scale, bias = scale * values, bias * values
        else:
            bias = bias + values
        last = node.output(0)
    return last, scale, bias


def fold_upsample_convs(model: Any) -> int:
    """Rewrite every nearest-2x Interpolate -> 3x3 Convolution pair in the OpenVINO `model` (static shapes) as four
    2x2 phase convolutions at the input's resolution and a DepthToSpace, in place; returns how many were rewritten."""
    import openvino.opset12 as ops

    folded = 0
    for upsample in [op for op in model.get_ordered_ops() if op.get_type_name() == "Interpolate"]:
        conv = _upsample_conv(upsample)
        if conv is None:
            continue
        kernel = _constant(conv.input_value(1))
        x = upsample.input_value(0)
        phases = [ops.convolution(x, ops.constant(_phase_kernel(kernel, row, col)), [1, 1], [1 - row, 1 - col],
                                  [row, col], [1, 1]) for row in (0, 1) for col in (0, 1)]
        # channel block row*2+col holds output pixels (2i+row, 2j+col): blocks_first DepthToSpace interleaves them
        interleaved = ops.depth_to_space(ops.concat(phases, 1), "blocks_first", 2)
        interleaved.set_friendly_name(conv.get_friendly_name())
        names = conv.output(0).get_names()
        conv.output(0).replace(interleaved.output(0))
        if names:
            interleaved.output(0).set_names(names)
        folded += 1
    if folded:
        model.validate_nodes_and_infer_types()
    return folded


def _phase_kernel(kernel: np.ndarray, row: int, col: int) -> np.ndarray:
    """The [O, I, 2, 2] kernel that gives output phase (row, col) of a 3x3 `kernel` over a nearest 2x upsample.

    Output row 2i+row reads upsampled rows 2i+row-1 .. 2i+row+1, i.e. source rows (i-1, i, i) for row 0 and
    (i, i, i+1) for row 1: the taps on one source row add up (summed in float64, rounded once)."""
    def fold(k: np.ndarray, phase: int, axis: int) -> np.ndarray:
        first, middle, last = (np.take(k, tap, axis) for tap in range(3))
        return np.stack((first, middle + last) if phase == 0 else (first + middle, last), axis)

    return fold(fold(kernel.astype(np.float64), row, 2), col, 3).astype(kernel.dtype)


def _upsample_conv(upsample: Any) -> Any | None:
    """The Convolution that alone reads `upsample` when this is a nearest, integer 2x upsampling of both spatial axes
    of a static [N, C, H, W] map (source pixel i // 2) and the convolution is 3x3, stride 1, dilation 1, padding 1
    with constant weights; else None."""
    attributes = upsample.get_attributes()
    nearest_floor = (attributes.get("mode") == "nearest" and attributes.get("nearest_mode") == "floor"
                     and attributes.get("coordinate_transformation_mode") == "asymmetric"
                     and not attributes.get("antialias") and not any(attributes.get("pads_begin", []))
                     and not any(attributes.get("pads_end", [])))
    source, upsampled = upsample.get_input_partial_shape(0), upsample.get_output_partial_shape(0)
    if not nearest_floor or not (source.is_static and upsampled.is_static) or len(source) != 4:
        return None
    (n, c, h, w), (n2, c2, h2, w2) = ([d.get_length() for d in shape] for shape in (source, upsampled))
    if (n2, c2, h2, w2) != (n, c, 2 * h, 2 * w):
        return None
    if str(attributes.get("shape_calculation_mode")) == "scales":
        # the output is floor(size * scale), so a scale in [2, 2 + 1/size) also doubles the map, but the source pixel
        # is floor(i / scale): only an exact 2 (and 1 on the other axes) is the pattern
        scales = _constant(upsample.input_value(2 if upsample.get_type_info().version_id == "opset4" else 1))
        if scales is None or not np.isin(scales, (1.0, 2.0)).all():
            return None
    conv = _single_consumer(upsample.output(0))
    if conv is None or conv.get_type_name() != "Convolution" or conv.input_value(0) != upsample.output(0):
        return None
    kernel = _constant(conv.input_value(1))
    conv_attributes = conv.get_attributes()
    if (kernel is None or kernel.ndim != 4 or kernel.shape[2:] != (3, 3) or kernel.dtype.kind != "f"
            or list(conv_attributes["strides"]) != [1, 1] or list(conv_attributes["dilations"]) != [1, 1]
            or list(conv_attributes["pads_begin"]) != [1, 1] or list(conv_attributes["pads_end"]) != [1, 1]
            or str(conv_attributes.get("auto_pad", "explicit")).lower() not in ("explicit", "notset")):
        return None
    return conv


def split_geglu_projections(model: Any) -> int:
    """Rewrite every constant-weight MatMul -> Add(bias) whose output is read only by two Slices taking its first and
    second half along the last axis (and by the shape arithmetic that computes their bounds) as two MatMul -> Add,
    one per half, in the OpenVINO `model` (static shapes), in place; returns how many were rewritten."""
    import openvino.opset12 as ops

    split = 0
    for add in [op for op in model.get_ordered_ops() if op.get_type_name() == "Add"]:
        match = _geglu(add)
        if match is None:
            continue
        whole, weight, bias, transpose_b, (first, second) = match
        half = bias.size // 2
        halves = []
        for role, part in (("value", slice(0, half)), ("gate", slice(half, 2 * half))):
            w = weight[part] if transpose_b else weight[:, part]
            product = ops.matmul(whole.input_value(0), ops.constant(np.ascontiguousarray(w)), False, transpose_b)
            product.set_friendly_name(f"{whole.get_friendly_name()}/{role}")  # named in per-layer profiles
            halves.append(ops.add(product, ops.constant(np.ascontiguousarray(bias[..., part]))))
        for sliced, replacement in zip((first, second), halves):
            replacement.set_friendly_name(sliced.get_friendly_name())
            sliced.output(0).replace(replacement.output(0))
        split += 1
    if split:
        model.validate_nodes_and_infer_types()
    return split


def _geglu(add: Any) -> tuple[Any, np.ndarray, np.ndarray, bool, tuple[Any, Any]] | None:
    """(the MatMul, its weight, the bias, transpose_b, (first-half Slice, second-half Slice)) when `add` is the pattern
    split_geglu_projections rewrites; else None."""
    inputs = [add.input_value(i) for i in range(2)]
    products = [i for i in inputs if i.get_node().get_type_name() == "MatMul"]
    biases = [_constant(i) for i in inputs if i.get_node().get_type_name() == "Constant"]
    if len(products) != 1 or len(biases) != 1 or _single_consumer(products[0]) is None:
        return None
    product, bias = products[0].get_node(), biases[0]
    weight = _constant(product.input_value(1))
    attributes = product.get_attributes()
    shape = add.get_output_partial_shape(0)
    if (weight is None or weight.ndim != 2 or attributes["transpose_a"] or not shape.is_static
            or product.get_output_partial_shape(0) != shape):
        return None
    width = shape[len(shape) - 1].get_length()
    if width % 2 or bias.size != width or bias.shape[-1] != width:
        return None
    readers = [t.get_node() for t in add.output(0).get_target_inputs()]
    slices = [r for r in readers if r.get_type_name() == "Slice"]
    if len(slices) != 2:
        return None
    halves = {}
    for reader in slices:
        bounds = [_static_value(reader.input_value(i)) for i in range(1, reader.get_input_size())]
        if len(bounds) != 4 or any(b is None or b.size != 1 for b in bounds):
            return None
        start, stop, step, axis = (int(b.reshape(-1)[0]) for b in bounds)
        if step != 1 or axis not in (-1, len(shape) - 1):
            return None
        halves[(start, min(stop, width))] = reader
    first, second = halves.get((0, width // 2)), halves.get((width // 2, width))
    # the exporter's bounds come from ShapeOf(projection): once the slices go, nothing may still need the projection
    others = [r for r in readers if r.get_type_name() != "Slice"]
    if first is None or second is None or not all(
            r.get_type_name() == "ShapeOf" and _feeds_only(r.output(0), slices) for r in others):
        return None
    return product, weight, bias, bool(attributes["transpose_b"]), (first, second)


def _static_value(output: Any, depth: int = 8) -> np.ndarray | None:
    """The value of a constant or of shape arithmetic over static shapes (ShapeOf -> Gather -> Add -> Divide ...),
    evaluated op by op; None when it depends on data or is deeper than `depth` ops."""
    import openvino as ov

    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node.get_data()
    if kind == "ShapeOf":
        shape = node.get_input_partial_shape(0)
        return np.array(shape.to_shape(), node.get_output_element_type(0).to_dtype()) if shape.is_static else None
    if depth == 0 or node.get_output_size() != 1 or not node.get_output_partial_shape(0).is_static:
        return None
    arguments = [_static_value(i, depth - 1) for i in node.input_values()]
    if any(a is None for a in arguments):
        return None
    result = ov.Tensor(node.get_output_element_type(0), node.get_output_partial_shape(0).to_shape())
    if not node.evaluate([result], [ov.Tensor(np.ascontiguousarray(a)) for a in arguments]):
        return None
    return result.data.copy()


def _feeds_only(output: Any, ends: list[Any], depth: int = 8) -> bool:
    """Whether everything computed from `output` (within `depth` ops) is read only by the nodes `ends`."""
    ids = {end.get_instance_id() for end in ends}
    for target in output.get_target_inputs():
        node = target.get_node()
        if node.get_instance_id() in ids:
            continue
        if depth == 0 or node.get_type_name() == "Result" or not all(
                _feeds_only(o, ends, depth - 1) for o in node.outputs()):
            return False
    return True

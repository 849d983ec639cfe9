"""An ONNX Runtime CPU file beside the TensorRT one: the same Q/DQ graph, minus what stops ONNX
Runtime's x86 kernels from fusing it.

deploypipe's quantized models use symmetric grids; a signed 8-bit grid is [-127, 127] (TensorRT's
convention), written as ``Clip(-127 s, 127 s)`` before an INT8 ``QuantizeLinear``. ONNX Runtime fuses
``DequantizeLinear -> Conv -> QuantizeLinear`` into one ``QLinearConv`` (and the same for Add and
MatMul) only when nothing sits between the op and the next Q, and that Clip does. ``model.cpu.onnx``
drops those Clips, so the INT8 container's full [-128, 127] range applies: an input below -127.5
steps becomes -128 steps instead of -127 (one step, on values already clipped). That is the only
change in the numbers (the two rewrites below compute the same values); the export stage measures
the CPU file's agreement with the PyTorch model like the other's.

A ReLU between a Conv and its Q blocks the fusion as well; a model quantized with
``unsigned_activations`` has UINT8 Qs with zero point 0 there, which make the ReLU redundant, and
ONNX Runtime removes it — when the ReLU feeds nothing else. Such a model puts a residual add's
input on the grid of the convolution that reads the same tensor (quantize's share_input_grids), so
the exporter writes two identical QuantizeLinear (and DequantizeLinear) nodes on that tensor; the
CPU file keeps one of each (the same numbers), which leaves the ReLU a single consumer and lets the
add fuse into ``QLinearAdd``.

Weights: a QuantizeLinear on a constant weight is computed once here (``np.rint`` of x / s, ties to
even, as ONNX specifies, then saturated) and stored as the INT8 initializer its DequantizeLinear
reads — ONNX Runtime folds the same constant at load, so the numbers do not change; the file is about
4x smaller. ``integer_kernels`` counts what ONNX Runtime fused, from its optimised graph.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np

from .trt_lint import GraphIndex, attribute

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger", "QGemm")


def _symmetric_grid_clip(g: GraphIndex, clip, quantize) -> bool:
    """``clip`` is Clip(-127 s, 127 s) in front of an INT8 QuantizeLinear with scale s, zero point 0."""
    if len(clip.input) < 3 or len(quantize.input) < 3:
        return False
    lo, hi = g.array(clip.input[1]), g.array(clip.input[2])
    scale, zero = g.array(quantize.input[1]), g.array(quantize.input[2])
    if any(v is None for v in (lo, hi, scale, zero)) or zero.dtype != np.int8 or np.any(zero != 0):
        return False
    s = float(np.asarray(scale).reshape(-1)[0])
    return bool(np.isclose(float(lo), -127 * s, rtol=1e-5) and np.isclose(float(hi), 127 * s, rtol=1e-5))


def _drop_grid_clips(model) -> int:
    """Remove the [-127, 127] Clips in front of INT8 QuantizeLinear nodes; returns how many."""
    g = GraphIndex(model)
    dropped = []
    for node in model.graph.node:
        if node.op_type != "Clip":
            continue
        after = [u for u, _ in g.consumers.get(node.output[0], [])]
        if after and all(u.op_type == "QuantizeLinear" and _symmetric_grid_clip(g, node, u) for u in after):
            for u in after:
                u.input[0] = node.input[0]
            dropped.append(node)
    for node in dropped:
        model.graph.node.remove(node)
    return len(dropped)


def _key(g: GraphIndex, node) -> tuple | None:
    """What a Q/DQ node computes: its input, scale and zero point values (with dtype) and attributes;
    None when a scale or zero point is not a constant."""
    from onnx import helper

    parts = [node.op_type, node.input[0]]
    for name in node.input[1:]:
        value = g.array(name)
        if value is None:
            return None
        parts.append((value.dtype.str, value.shape, value.tobytes()))
    values = ((a.name, helper.get_attribute_value(a)) for a in node.attribute)
    parts.append(tuple(sorted((k, v if isinstance(v, (int, float, str, bytes)) else repr(v)) for k, v in values)))
    return tuple(parts)


def _merge_duplicates(model) -> int:
    """Keep one of each set of QuantizeLinear (then DequantizeLinear) nodes that compute the same
    thing from the same tensor; the others' readers read the kept one. Returns how many were removed."""
    g, graph, removed = GraphIndex(model), model.graph, 0
    outputs = {o.name for o in graph.output}
    for op in ("QuantizeLinear", "DequantizeLinear"):
        first: dict[tuple, str] = {}
        rename: dict[str, str] = {}
        gone = []
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            if node.op_type != op or len(node.output) != 1 or node.output[0] in outputs:
                continue  # a graph output keeps its producer
            key = _key(g, node)
            if key is None:
                continue
            if key in first:
                rename[node.output[0]] = first[key]
                gone.append(node)
            else:
                first[key] = node.output[0]
        for node in gone:
            graph.node.remove(node)
        removed += len(gone)
    return removed


def _fold_weight_quantizers(model) -> int:
    """QuantizeLinear on a constant initializer read by nothing else -> that initializer, quantized
    (ONNX's rounding: ties to even, saturated to the zero point's type). Returns how many were folded."""
    from onnx import numpy_helper

    g, graph = GraphIndex(model), model.graph
    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in g.inits or len(node.input) < 3 \
                or len(g.consumers[node.input[0]]) != 1 or attribute(node, "block_size", 0):
            continue
        scale, zero = g.array(node.input[1]), g.array(node.input[2])
        if scale is None or zero is None or zero.dtype not in (np.int8, np.uint8):
            continue
        x = g.array(node.input[0]).astype(np.float32)
        shape = [1] * x.ndim
        if scale.size > 1:
            shape[attribute(node, "axis", 1) % x.ndim] = scale.size
        s = np.asarray(scale, np.float32).reshape(shape if scale.size > 1 else ())
        z = np.asarray(zero).astype(np.int32).reshape(shape if zero.size > 1 else ())
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / s).astype(np.int64) + z, info.min, info.max).astype(zero.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    for node in folded:  # the float weight had this Q as its only reader
        graph.node.remove(node)
        graph.initializer.remove(g.inits[node.input[0]])
    return len(folded)


def cpu_file(src: str | Path, dst: str | Path) -> int:
    """Write ``dst``: ``src`` without the [-127, 127] Clips in front of INT8 QuantizeLinear nodes,
    with one of each set of identical Q/DQ nodes on a tensor, and INT8 weight initializers (module
    docstring). Returns how many Clips were dropped."""
    import onnx

    model = onnx.load(str(src))
    dropped = _drop_grid_clips(model)
    _merge_duplicates(model)
    _fold_weight_quantizers(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dropped


def integer_kernels(path: str | Path) -> dict[str, int]:
    """{op: count} of the integer kernels in ONNX Runtime's optimised CPU graph of ``path``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:  # a diagnostic: a model ONNX Runtime cannot save optimised (over 2 GB, say) is not an export error
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
        except Exception:  # noqa: BLE001
            return {}
    return {op: ops[op] for op in INTEGER_OPS if ops[op]}

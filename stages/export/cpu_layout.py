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

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger", "QGemm")


class _Constants:
    """Constant tensors of a graph by name (initializers and Constant nodes), as numpy arrays; read
    on demand, so a large graph is not scanned once per lookup."""

    def __init__(self, graph):
        self.protos = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.protos[node.output[0]] = node.attribute[0].t

    def __call__(self, name: str):
        from onnx import numpy_helper

        proto = self.protos.get(name)
        return None if proto is None else numpy_helper.to_array(proto)


def _symmetric_grid_clip(const: _Constants, clip, quantize) -> bool:
    """``clip`` is Clip(-127 s, 127 s) in front of an INT8 QuantizeLinear with scale s, zero point 0."""
    if len(clip.input) < 3 or len(quantize.input) < 3:
        return False
    lo, hi = const(clip.input[1]), const(clip.input[2])
    scale, zero = const(quantize.input[1]), const(quantize.input[2])
    if any(v is None for v in (lo, hi, scale, zero)) or zero.dtype != np.int8 or np.any(zero != 0):
        return False
    s = float(np.asarray(scale).reshape(-1)[0])
    return bool(np.isclose(float(lo), -127 * s, rtol=1e-5) and np.isclose(float(hi), 127 * s, rtol=1e-5))


def _users(graph) -> dict[str, list]:
    users = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _drop_grid_clips(graph) -> int:
    """Remove the [-127, 127] Clips in front of INT8 QuantizeLinear nodes; returns how many."""
    users, const = _users(graph), _Constants(graph)
    dropped = []
    for node in graph.node:
        if node.op_type != "Clip":
            continue
        after = users[node.output[0]]
        if after and all(u.op_type == "QuantizeLinear" and _symmetric_grid_clip(const, node, u) for u in after):
            for u in after:
                u.input[0] = node.input[0]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    return len(dropped)


def _key(const: _Constants, node) -> tuple | None:
    """What a Q/DQ node computes: its input, scale and zero point values (with dtype) and attributes;
    None when a scale or zero point is not a constant."""
    parts = [node.op_type, node.input[0]]
    for name in node.input[1:]:
        value = const(name)
        if value is None:
            return None
        parts.append((value.dtype.str, value.shape, value.tobytes()))
    parts.append(tuple(sorted((a.name, _attribute_value(a)) for a in node.attribute)))
    return tuple(parts)


def _attribute_value(attribute):
    from onnx import helper

    value = helper.get_attribute_value(attribute)
    return value if isinstance(value, (int, float, str, bytes)) else repr(value)


def _merge_duplicates(graph) -> int:
    """Keep one of each set of QuantizeLinear (then DequantizeLinear) nodes that compute the same
    thing from the same tensor; the others' readers read the kept one. Returns how many were removed."""
    removed, const = 0, _Constants(graph)
    for op in ("QuantizeLinear", "DequantizeLinear"):
        first: dict[tuple, str] = {}
        rename: dict[str, str] = {}
        gone = []
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            if node.op_type != op or len(node.output) != 1:
                continue
            key = _key(const, node)
            if key is None:
                continue
            if key in first:
                rename[node.output[0]] = first[key]
                gone.append(node)
            else:
                first[key] = node.output[0]
        outputs = {o.name for o in graph.output}
        for node in gone:
            if node.output[0] in outputs:  # a graph output keeps its producer
                continue
            graph.node.remove(node)
            removed += 1
    return removed


def _fold_weight_quantizers(graph) -> int:
    """QuantizeLinear on a constant initializer -> that initializer, quantized (ONNX's rounding: ties
    to even, saturated to the zero point's type). Returns how many were folded."""
    from onnx import numpy_helper

    inits = {init.name: init for init in graph.initializer}
    users, const = _users(graph), _Constants(graph)
    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        scale, zero = const(node.input[1]), const(node.input[2])
        if scale is None or zero is None or zero.dtype not in (np.int8, np.uint8) or len(users[node.input[0]]) != 1:
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue
        shape = [1] * x.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis % x.ndim] = scale.size
        s = np.asarray(scale, np.float32).reshape(shape if scale.size > 1 else ())
        z = np.asarray(zero).astype(np.int32).reshape(shape if zero.size > 1 else ())
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / s).astype(np.int64) + z, info.min, info.max).astype(zero.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    dead = set()
    for node in folded:
        graph.node.remove(node)
        dead.add(node.input[0])
    still_read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name in dead and i.name not in still_read]:
        graph.initializer.remove(init)
    return len(folded)


def cpu_file(src: str | Path, dst: str | Path) -> int:
    """Write ``dst``: ``src`` without the [-127, 127] Clips in front of INT8 QuantizeLinear nodes,
    with one of each set of identical Q/DQ nodes on a tensor, and INT8 weight initializers (module
    docstring). Returns how many Clips were dropped."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    dropped = _drop_grid_clips(graph)
    _merge_duplicates(graph)
    _fold_weight_quantizers(graph)
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

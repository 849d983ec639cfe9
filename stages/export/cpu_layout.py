"""An ONNX Runtime CPU file beside the TensorRT one: the same Q/DQ graph, minus what stops ONNX
Runtime's x86 kernels from fusing it.

deploypipe's quantized models use symmetric grids; a signed 8-bit grid is [-127, 127] (TensorRT's
convention), written as ``Clip(-127 s, 127 s)`` before an INT8 ``QuantizeLinear``. ONNX Runtime fuses
``DequantizeLinear -> Conv -> QuantizeLinear`` into one ``QLinearConv`` (and the same for Add and
MatMul) only when nothing sits between the op and the next Q, and that Clip does. ``model.cpu.onnx``
drops exactly those Clips — nothing else changes — so the INT8 container's full [-128, 127] range
applies: an input below -127.5 steps becomes -128 steps instead of -127 (one step, on values already
clipped). Everywhere else the two files compute the same numbers; the export stage measures the
CPU file's agreement with the PyTorch model like the other's.

A ReLU between a Conv and its Q blocks the fusion as well; a model quantized with
``unsigned_activations`` has UINT8 Qs with zero point 0 there, which make the ReLU redundant, and
ONNX Runtime removes it. ``integer_kernels`` counts what ONNX Runtime fused, from its optimised graph.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger", "QGemm")


def _constant(graph, name: str):
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _symmetric_grid_clip(graph, clip, quantize) -> bool:
    """``clip`` is Clip(-127 s, 127 s) in front of an INT8 QuantizeLinear with scale s, zero point 0."""
    if len(clip.input) < 3 or len(quantize.input) < 3:
        return False
    lo, hi = _constant(graph, clip.input[1]), _constant(graph, clip.input[2])
    scale, zero = _constant(graph, quantize.input[1]), _constant(graph, quantize.input[2])
    if any(v is None for v in (lo, hi, scale, zero)) or zero.dtype != np.int8 or np.any(zero != 0):
        return False
    s = float(np.asarray(scale).reshape(-1)[0])
    return bool(np.isclose(float(lo), -127 * s, rtol=1e-5) and np.isclose(float(hi), 127 * s, rtol=1e-5))


def cpu_file(src: str | Path, dst: str | Path) -> int:
    """Write ``dst``: ``src`` without the [-127, 127] Clips in front of INT8 QuantizeLinear nodes.
    Returns how many were dropped."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    users = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    dropped = []
    for node in graph.node:
        if node.op_type != "Clip":
            continue
        after = users[node.output[0]]
        if after and all(u.op_type == "QuantizeLinear" and _symmetric_grid_clip(graph, node, u) for u in after):
            for u in after:
                u.input[0] = node.input[0]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return len(dropped)


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

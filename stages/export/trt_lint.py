"""A static check of an ONNX file against TensorRT's explicit-quantization rules, before any build.

TensorRT (10/11, and TensorRT for RTX) runs a quantized network from its QuantizeLinear /
DequantizeLinear nodes and refuses, or silently runs in higher precision, what breaks these rules:

- ``symmetric``: every zero point is 0 (TensorRT's parser rejects any other);
- ``type``: quantized types are INT8, FP8 (E4M3) or INT4 — not unsigned 8-bit;
- ``weight-axis``: a weight quantized per channel is quantized along its output channels (Conv axis
  0; Gemm along N: axis 0 with transB, else 1; MatMul axis 1, the last);
- ``activation-per-tensor``: activations (anything that is not a weight) have one scale;
- ``int4``: INT4 is weight-only, block-quantized (``block_size``), and only for MatMul/Gemm — no INT4
  convolution, no INT4 activation;
- ``bias``: no Q/DQ on a Conv or Gemm bias (TensorRT quantizes the bias itself).

``lint_onnx`` names each offending node; ``engine.parser_errors`` adds the verdict of TensorRT's own
ONNX parser when a TensorRT module is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

QDQ = ("QuantizeLinear", "DequantizeLinear")
PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class Finding:
    node: str    # the offending Q/DQ node's name (or its output's, when unnamed)
    op: str
    rule: str    # symmetric | type | weight-axis | activation-per-tensor | int4 | bias
    detail: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.rule}: {self.detail}"


class GraphIndex:
    """Where each tensor of an ONNX model comes from and goes: initializers and Constant values by
    name, producers, consumers (node, input index). A snapshot: build a new one after editing."""

    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.constants = {n.output[0]: next(a.t for a in n.attribute if a.name == "value")
                          for n in g.node if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)}
        self.producer = {out: n for n in g.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.numpy = numpy_helper.to_array

    def tensor(self, name: str):
        return self.inits.get(name) or self.constants.get(name)

    def array(self, name: str) -> Optional[np.ndarray]:
        t = self.tensor(name)
        return None if t is None else self.numpy(t)

    def is_weight(self, name: str) -> bool:
        """A constant, or a constant that went through a QuantizeLinear (our exporter's weight Q/DQ)."""
        if self.tensor(name) is not None:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "QuantizeLinear" and self.tensor(node.input[0]) is not None

    def final_consumers(self, name: str, axis: Optional[int] = 0) -> list:
        """(node, input index, where ``axis`` of ``name`` ends up in that input: None when a reshape
        makes it unknown) for the nodes that use ``name``, looking through reshapes, transposes and casts."""
        out = []
        for node, i in self.consumers.get(name, []):
            if node.op_type in PASS_THROUGH and i == 0:
                moved = axis
                if node.op_type == "Transpose" and axis is not None:
                    perm = attribute(node, "perm")
                    moved = list(perm).index(axis) if perm is not None else None  # default: reversed, rank unknown
                elif node.op_type not in ("Identity", "Cast"):
                    moved = None
                out += self.final_consumers(node.output[0], moved)
            else:
                out.append((node, i, axis))
        return out


def attribute(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _quant_type(g: GraphIndex, node) -> Optional[int]:
    """The ONNX element type of the quantized side: the zero point's, else the output (Q) or input (DQ)."""
    if len(node.input) > 2 and node.input[2]:
        t = g.tensor(node.input[2])
        if t is not None:
            return t.data_type
    if node.op_type == "DequantizeLinear":
        t = g.tensor(node.input[0])
        if t is not None:
            return t.data_type
        producer = g.producer.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return _quant_type(g, producer)
    attr = attribute(node, "output_dtype")
    return attr or None


def _rank(g: GraphIndex, name: str) -> int:
    """Rank of a weight: of the constant itself, or of the constant its QuantizeLinear quantizes."""
    t = g.tensor(name)
    if t is None and name in g.producer:
        t = g.tensor(g.producer[name].input[0])
    return len(t.dims) if t is not None else 0


def _output_axis(consumer, index: int, weight_rank: int) -> Optional[int]:
    """The output-channel axis of the weight input ``index`` of ``consumer``."""
    if consumer.op_type in ("Conv", "ConvTranspose") and index == 1:
        return 0 if consumer.op_type == "Conv" else 1
    if consumer.op_type == "Gemm" and index == 1:
        return 0 if attribute(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul" and index == 1:
        return weight_rank - 1
    return None


def lint_onnx(model_or_path) -> list[Finding]:
    """Every Q/DQ node of the file that breaks one of TensorRT's rules (module docstring); empty when
    the file is clean."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    g = GraphIndex(model)
    allowed = {TensorProto.INT8, TensorProto.INT4, getattr(TensorProto, "FLOAT8E4M3FN", -1)}
    int4 = {TensorProto.INT4, getattr(TensorProto, "UINT4", -2)}
    found: list[Finding] = []
    for node in model.graph.node:
        if node.op_type not in QDQ:
            continue
        name = node.name or node.output[0]

        def flag(rule: str, detail: str) -> None:
            found.append(Finding(name, node.op_type, rule, detail))

        zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None and np.any(zero != 0):
            flag("symmetric", f"zero point {np.unique(zero)[:4].tolist()} is not 0; TensorRT takes symmetric "
                              "quantization only")
        qtype = _quant_type(g, node)
        if qtype is not None and qtype not in allowed:
            flag("type", f"quantized type {TensorProto.DataType.Name(qtype)}; TensorRT quantizes to INT8, FP8 or INT4")
        scale = g.array(node.input[1])
        weight = g.is_weight(node.input[0])
        if node.op_type == "QuantizeLinear" and not weight and scale is not None and scale.size > 1:
            flag("activation-per-tensor", f"an activation quantized with {scale.size} scales; TensorRT takes one "
                                          "scale per activation tensor")
        if node.op_type == "QuantizeLinear" and not weight and qtype in int4:
            flag("int4", "INT4 on an activation; TensorRT's INT4 is weight-only")
        if node.op_type != "DequantizeLinear":
            continue
        rank = _rank(g, node.input[0])
        axis = attribute(node, "axis", 1)
        axis = axis + rank if axis < 0 and rank else axis
        for consumer, index, moved in g.final_consumers(node.output[0], axis):
            where = f"{consumer.op_type} '{consumer.name or consumer.output[0]}'"
            if consumer.op_type in ("Conv", "Gemm", "ConvTranspose") and index == 2:
                flag("bias", f"Q/DQ on the bias of {where}; TensorRT quantizes the bias itself (leave it float)")
                continue
            if qtype in int4:
                if consumer.op_type not in ("MatMul", "Gemm"):
                    flag("int4", f"INT4 weights of {where}; TensorRT's INT4 is for MatMul/Gemm weights only (no "
                                 "INT4 convolution)")
                elif attribute(node, "block_size", 0) in (0, None):
                    flag("int4", f"INT4 weights of {where} without block_size; TensorRT's INT4 is block-quantized")
            if not weight or scale is None or scale.size <= 1 or moved is None:
                continue
            want = _output_axis(consumer, index, rank)
            blocked = attribute(node, "block_size", 0) not in (0, None)
            if want is not None and moved != want and not blocked:
                flag("weight-axis", f"weights of {where} quantized along axis {moved} of the input it feeds; "
                                    f"per-channel scales must run along the output channels (axis {want})")
    return found

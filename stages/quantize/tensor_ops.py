"""Quantizers on activation-by-activation operations: residual adds and attention matmuls.

TensorRT's explicit-quantization rules put Q/DQ not only on the inputs of Conv/Gemm but also on
both inputs of residual adds (so the add fuses into the preceding convolution's INT8 epilogue) and on
both inputs of the MatMuls inside attention (Q·Kᵀ and P·V). For the exported ONNX file to compute
what the PyTorch model computes, the fake-quant model has to quantize the same tensors. This module
finds those operations with torch.fx and puts an ``ActQuant`` (per-tensor, symmetric) in front of
each input:

- ``add`` (``+``, ``torch.add``, ``Tensor.add``, ``+=``) whose two operands are both activations
  (parameters and constants, e.g. a position embedding, are left alone);
- ``matmul`` / ``@`` / ``bmm`` whose two operands are both activations (attention written out, as in
  BERT-style encoders);
- ``F.scaled_dot_product_attention`` (no mask or a causal one, no dropout) is replaced by an
  explicit ``QuantAttention``: softmax(q̂ k̂ᵀ · scale) quantized to P̂, then P̂ v̂ — the same
  function, written as the two MatMuls that get Q/DQ.

``nn.MultiheadAttention`` is an fx leaf whose projections are raw parameters; its inside is not
quantized (its ``out_proj`` Linear is, as a layer). Models fx cannot trace keep these operations in
floating point; the stage says so in its log.

The quantizers are named after the fx node they feed (``tq_<node>_in<i>``), so tracing the same
architecture again yields the same names: that is how a saved model is rebuilt.

A residual add's input that is also a Conv/Linear layer's input (a block's input ``x`` in
``conv1(x) ... + x``) records that layer as ``shares``. With unsigned grids (a CPU target),
``share_input_grids`` puts that add input on the layer's own unsigned input grid: one quantizer on
the tensor instead of two, so the exported graph has one QuantizeLinear there, the ReLU in front of
it is redundant, and ONNX Runtime fuses the add into a ``QLinearAdd``. (TensorRT's layout keeps the
signed per-add grid.)
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .fx_trace import trace
from .quantizer import export_fake_quant, fake_quant

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
SDPA = F.scaled_dot_product_attention


class ActQuant(nn.Module):
    """Per-tensor symmetric fake quantization of an activation; ``bits=None`` or ``enabled=False``
    passes it through (the FP reference model carries disabled copies, so calibration can hook
    them)."""

    def __init__(self, bits: Optional[int], signed: bool = True, enabled: bool = True,
                 shares: Optional[str] = None):
        super().__init__()
        self.bits, self.signed, self.enabled = bits, signed, enabled
        self.shares = shares  # the layer whose input is the same tensor (see share_input_grids)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self.bits):
            return x
        if torch.onnx.is_in_onnx_export():
            return export_fake_quant(x, float(self.scale), self.bits, self.signed)
        return fake_quant(x, self.scale, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}" + \
            (f", shares={self.shares}" if self.shares else "")


class QuantAttention(nn.Module):
    """``scaled_dot_product_attention`` as two explicit matmuls with quantized inputs."""

    def __init__(self, bits: Optional[int], is_causal: bool = False, scale: Optional[float] = None,
                 enabled: bool = True):
        super().__init__()
        self.is_causal, self.scale = is_causal, scale
        self.q, self.k, self.v, self.p = (ActQuant(bits, enabled=enabled) for _ in range(4))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                return_probs: bool = False):
        """softmax(q̂ k̂ᵀ · scale + mask) quantized, times v̂; ``mask`` is added to the scores
        (-inf where attention is not allowed)."""
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(self.q(q), self.k(k.transpose(-2, -1))) * scale  # Q/DQ right at the MatMul
        if self.is_causal:
            t, s = scores.shape[-2], scores.shape[-1]
            causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.p(probs), self.v(v))
        return (out, probs) if return_probs else out


def _is_activation(arg) -> bool:
    """A floating-point tensor computed from the input (shape propagation ran first)."""
    if not isinstance(arg, torch.fx.Node) or arg.op == "get_attr":
        return False
    meta = arg.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _kind(node: torch.fx.Node) -> Optional[str]:
    if node.op == "call_function":
        if node.target in ADD_FUNCTIONS:
            kind = "add"
        elif node.target in MATMUL_FUNCTIONS:
            kind = "matmul"
        elif node.target is SDPA:
            kw = node.kwargs
            if (len(node.args) == 3 and kw.get("attn_mask") is None and not kw.get("dropout_p")
                    and set(kw) <= {"attn_mask", "dropout_p", "is_causal", "scale"}):
                return "attention"
            return None
        else:
            return None
    elif node.op == "call_method" and node.target in ("add", "add_", "matmul", "bmm"):
        kind = "add" if node.target.startswith("add") else "matmul"
    else:
        return None
    if len(node.args) < 2 or not (_is_activation(node.args[0]) and _is_activation(node.args[1])):
        return None
    if kind == "add" and node.kwargs.get("alpha", 1) != 1:
        return None
    return kind


def _layer_user(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[str]:
    """The first Conv2d/Linear module (by graph order) that takes ``node``'s tensor as its input
    (looking through identity modules, e.g. a ResNet block's ``shortcut = nn.Identity()``)."""
    while node.op == "call_module" and node.args and isinstance(node.args[0], torch.fx.Node):
        module = gm.get_submodule(node.target)
        if not (isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0)):
            break
        node = node.args[0]
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node and \
                isinstance(gm.get_submodule(user.target), (nn.Conv2d, nn.Linear)):
            return str(user.target)
    return None


def insert_tensor_quantizers(model: nn.Module, input_shape: tuple[int, ...], residual_bits: Optional[int],
                             matmul_bits: Optional[int], enabled: bool = True,
                             expected: Optional[list[dict]] = None) -> tuple[nn.Module, list[dict]]:
    """Trace ``model`` (shapes propagated with a random input of ``input_shape``, to tell tensors
    from shape arithmetic) and put quantizers before the inputs of its residual adds and activation
    matmuls (see the module docstring). Returns the new model (a GraphModule, or ``model`` itself
    when nothing is inserted or fx cannot trace it) and one record per inserted module:
    ``{"name", "op", "bits"}``, plus ``"shares"`` (an add input that is also a layer's input: that
    layer's name). With ``expected`` (records from a saved model), the insertion must reproduce
    exactly those names, and takes their ``signed`` (share_input_grids) as saved."""
    if not residual_bits and not matmul_bits:
        return model, []
    try:
        gm = trace(model)
        param = next(model.parameters(), None)
        example = torch.rand(2, *input_shape, device=param.device if param is not None else "cpu")
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
        gm.train(was_training)
    except Exception as err:  # data-dependent control flow etc.
        if expected:
            raise ValueError(f"cannot rebuild the quantized residual adds / matmuls: fx cannot trace the model "
                             f"({err})") from None
        return model, []
    graph = gm.graph
    records = []
    saved = {r["name"]: r for r in expected or []}
    for node in list(graph.nodes):
        kind = _kind(node)
        bits = residual_bits if kind == "add" else matmul_bits if kind in ("matmul", "attention") else None
        if not bits:
            continue
        if kind == "attention":
            name = f"tq_{node.name}"
            kw = node.kwargs
            gm.add_submodule(name, QuantAttention(bits, bool(kw.get("is_causal", False)), kw.get("scale"), enabled))
            with graph.inserting_after(node):
                new = graph.call_module(name, tuple(node.args))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            records.append({"name": name, "op": kind, "bits": bits})
            continue
        args = list(node.args)
        for i in (0, 1):
            name = f"tq_{node.name}_in{i}"
            record = {"name": name, "op": kind, "bits": bits}
            shares = _layer_user(gm, args[i]) if kind == "add" else None
            if shares:
                record["shares"] = shares
            signed = saved.get(name, {}).get("signed", True)
            gm.add_submodule(name, ActQuant(bits, signed=signed, enabled=enabled, shares=shares))
            with graph.inserting_before(node):
                args[i] = graph.call_module(name, (args[i],))
            records.append(record)
        node.args = tuple(args)
    if not records:
        return model, []
    if expected is not None and [r["name"] for r in records] != [r["name"] for r in expected]:
        raise ValueError("the model's residual adds / matmuls differ from the saved quantized model's; "
                         "was the model code changed since it was quantized?")
    graph.lint()
    gm.recompile()
    return gm, records


def tensor_quantizers(model: nn.Module) -> list[tuple[str, ActQuant]]:
    """Every ActQuant in the model (inside QuantAttention too), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def share_input_grids(model: nn.Module, records: list[dict]) -> list[str]:
    """Put each residual-add input that ``shares`` a layer's input on that layer's grid when the
    layer's input grid is unsigned with the same bits: the add quantizer becomes unsigned and takes
    the layer's scale (a copy, so call this again after anything that changes the layer's scale).
    Marks those records ``"signed": False`` (a reloaded model rebuilds them so); returns their names."""
    shared = []
    for record in records:
        name, layer_name = record["name"], record.get("shares")
        if not layer_name:
            continue
        q, layer = model.get_submodule(name), model.get_submodule(layer_name)
        if getattr(layer, "a_bits", None) != q.bits or getattr(layer, "a_signed", True):
            continue
        q.signed = False
        q.scale.copy_(layer.act_scale)
        record["signed"] = False
        shared.append(name)
    return shared


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in tensor_quantizers(model):
        m.enabled = enabled

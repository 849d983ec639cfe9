"""Fake-quantized layers, layer discovery, batch-norm folding, and the reloadable transform.

``QuantLayer`` wraps a Conv2d or Linear: its input is fake-quantized per tensor (``a_bits``), its
weight per output channel (``w_bits``); ``None`` bits keep that side in floating point, and 16
(``FP16``) rounds it to half precision (a layer "kept in FP16"). When both sides are on integer
grids the bias is rounded to the int32 accumulator grid s_x * s_w, as integer kernels hold it. The wrapped
layer's weight and bias stay trainable parameters next to the learnable scales, which is what
AdaQuant optimises. A zero weight stays exactly zero (symmetric grid, zero point 0); a layer marked
``sparse`` (N:M, from the sparsify stage) also keeps a mask of its zeros, so AdaQuant, BN
re-estimation and bias tuning cannot fill them in, and stores its weights compressed.

``fold_batchnorm`` folds every BatchNorm2d that directly follows a Conv2d into that conv (found by
torch.fx tracing; models fx cannot trace are left unfolded), as TensorRT does at build time.

The transform record ``{"kind": "quantize", "params": {"attention": [names of rewritten
nn.MultiheadAttention], "folded": [[conv, bn], ...], "layers":
{name: {"w_bits", "a_bits", "a_signed", "sparse" (N:M, for layers the sparsify stage made sparse)}},
"tensor_quant": [...], "residual_bits", "matmul_bits",
"input_shape"}}`` rebuilds exactly this structure on load (the residual-add / matmul quantizers of
tensor_ops.py are re-inserted by tracing the same architecture).
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.kernels.nm_compress import packed_index_bits
from deploypipe.models import register_transform

from .fx_trace import LeafTracer
from .quantizer import FP16, export_fake_quant, fake_quant, minmax_scale, round_fp16

Quantizable = Union[nn.Conv2d, nn.Linear]


class QuantLayer(nn.Module):
    fx_leaf = True  # traced as one call (fx_trace.py)

    def __init__(self, layer: Quantizable, w_bits: Optional[int], a_bits: Optional[int], a_signed: bool = True,
                 sparse: Optional[str] = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, not {type(layer).__name__}")
        self.layer = layer
        self.w_bits, self.a_bits, self.a_signed = w_bits, a_bits, a_signed
        w = layer.weight.detach()
        # an N:M layer (from the sparsify stage): its zeros are frozen, so calibration cannot fill them in
        self.sparse = sparse
        self.register_buffer("weight_mask", (w != 0) if sparse else None)
        self.weight_scale = nn.Parameter(minmax_scale(w, w_bits if w_bits and w_bits != FP16 else 8, axis=0))
        self.act_scale = nn.Parameter(torch.ones((), device=w.device))  # set by calibration

    def quantized_weight(self) -> torch.Tensor:
        return self._weight(self.layer.weight, self.weight_scale)

    def _weight(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.weight_mask is not None:
            w = w * self.weight_mask
        if self.w_bits == FP16:
            return round_fp16(w)
        return fake_quant(w, scale, self.w_bits, axis=0) if self.w_bits else w

    def _input(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.a_bits == FP16:
            return round_fp16(x)
        return fake_quant(x, scale, self.a_bits, self.a_signed) if self.a_bits else x

    @property
    def integer(self) -> bool:
        """Both sides on integer grids: the layer runs as an integer kernel."""
        return bool(self.w_bits and self.a_bits and FP16 not in (self.w_bits, self.a_bits))

    def _bias(self, bias: Optional[torch.Tensor], weight_scale: torch.Tensor, act_scale: torch.Tensor):
        """An integer kernel adds the bias in its int32 accumulator: on the grid of s_x * s_w per
        output channel (ONNX Runtime rounds it so; TensorRT adds it in float, where a value already
        on that grid is the same number)."""
        if bias is None or not self.integer:
            return bias
        step = act_scale * weight_scale
        b = bias / step
        return (b + (torch.round(b) - b).detach()) * step

    def quantized_bias(self) -> Optional[torch.Tensor]:
        return self._bias(self.layer.bias, self.weight_scale, self.act_scale)

    @torch.no_grad()
    def snap_to_grid(self) -> None:
        """Put the stored weight (and bias) on their grids, so that plain Q/DQ on them in an exported
        file is exact (deploypipe.onnx_export calls it on a copy)."""
        if self.w_bits and self.w_bits != FP16:
            if self.layer.bias is not None:
                self.layer.bias.copy_(self.quantized_bias())
            self.layer.weight.copy_(self.quantized_weight())

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     weight_scale: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
        """The forward pass with the given tensors in place of the module's own (for AdaQuant)."""
        x, w = self._input(x, act_scale), self._weight(weight, weight_scale)
        bias = self._bias(bias, weight_scale, act_scale)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        return self.forward_with(x, self.layer.weight, self.layer.bias, self.weight_scale, self.act_scale)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same arithmetic written with ops the ONNX exporter turns into QuantizeLinear /
        DequantizeLinear (symmetric, zero point 0, INT8 containers). A grid below 8 bits uses the
        INT8 grid with the same scale: weights are already on it (exact); activations get an explicit
        Clip to the narrower range first (exact too)."""
        if self.a_bits == FP16:
            x = round_fp16(x)  # Cast to float16 and back
        elif self.a_bits:
            x = export_fake_quant(x, float(self.act_scale), self.a_bits, self.a_signed)
        w = self.layer.weight
        if self.w_bits == FP16:
            w = round_fp16(w)
        elif self.w_bits:  # export_onnx put the weight on its grid already, so this Q/DQ is exact
            zero = torch.zeros(w.shape[0], dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(w, self.weight_scale.detach(), zero, 0, -128, 127)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def weight_storage_bits(self) -> int:
        """The weight at its bits (+ 32-bit per-channel scales), FP16 at 16, float at 32; an N:M
        layer compressed: N kept values and their positions (ceil(log2 M) bits each) per M weights."""
        per_weight = 32 if not self.w_bits else self.w_bits
        if self.sparse:
            per_weight = packed_index_bits(*map(int, self.sparse.split(":")), per_weight)
        scales = 32 * self.weight_scale.numel() if self.w_bits and self.w_bits != FP16 else 0
        return round(per_weight * self.layer.weight.numel()) + scales

    def storage_bits(self) -> int:
        """Deployed storage: the weight (``weight_storage_bits``), the bias and the input scale at 32."""
        bits = self.weight_storage_bits() + 32 * (self.layer.bias.numel() if self.layer.bias is not None else 0)
        return bits + (32 if self.a_bits and self.a_bits != FP16 else 0)

    def extra_repr(self) -> str:
        sparse = f", sparse={self.sparse}" if self.sparse else ""
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, a_signed={self.a_signed}{sparse}"


def quantizable_layers(model: nn.Module) -> list[tuple[str, Quantizable]]:
    """Conv2d and Linear layers not yet wrapped, in registration order (first = input side)."""
    wrapped = {f"{name}.layer" for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in wrapped]


def select_layers(names: list[str], include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[str]:
    """Layer names matching any ``include`` glob and no ``exclude`` glob, in order."""
    include, exclude = list(include), list(exclude)
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)
            and not any(fnmatch.fnmatch(n, p) for p in exclude)]


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# --------------------------------------------------------------------------- batch-norm folding
def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where a BatchNorm2d consumes a Conv2d's output and nothing else does."""
    import torch.fx

    try:
        graph = LeafTracer().trace(model)
    except Exception:  # data-dependent control flow etc.: leave such models unfolded
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
                pairs.append((src.target, node.target))
    return pairs


def _prepare_folded(model: nn.Module, pairs: list[list[str]]) -> None:
    """The structure after folding: BN replaced by Identity, conv given a bias."""
    for conv_name, bn_name in pairs:
        conv = _get(model, conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        replace_module(model, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[list[str]]:
    """Fold each BN that follows a conv into it (eval-mode statistics): w' = w * g/sqrt(v+eps),
    b' = (b - mean) * g/sqrt(v+eps) + beta. Returns the folded (conv, bn) names."""
    pairs = [list(p) for p in conv_bn_pairs(model)]
    for conv_name, bn_name in pairs:
        conv, bn = _get(model, conv_name), _get(model, bn_name)
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + bn.bias
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(new_bias)
        replace_module(model, bn_name, nn.Identity())
    return pairs


# --------------------------------------------------------------------------- the transform
def wrap_layers(model: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Replace each named layer by a QuantLayer with its bits ({name: {w_bits, a_bits, a_signed}})."""
    for name, bits in plan.items():
        replace_module(model, name, QuantLayer(_get(model, name), bits.get("w_bits"), bits.get("a_bits"),
                                               bits.get("a_signed", True), bits.get("sparse")))
    return model


@register_transform("quantize")
def apply_quantize_transform(model: nn.Module, params: dict) -> nn.Module:
    """Rebuild a quantized model's structure (values come from its state dict)."""
    from .attention import convert_attention
    from .tensor_ops import insert_tensor_quantizers

    if params.get("attention"):
        convert_attention(model, params.get("matmul_bits"), names=params["attention"])
    _prepare_folded(model, params.get("folded", []))
    if params.get("tensor_quant"):
        model, _ = insert_tensor_quantizers(model, tuple(params["input_shape"]), params.get("residual_bits"),
                                            params.get("matmul_bits"), expected=params["tensor_quant"])
    return wrap_layers(model, params["layers"])


TRANSFORM_MODULE = __name__

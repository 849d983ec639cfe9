"""Symmetric uniform fake-quantization with a straight-through estimator, and range initialisation.

    q(x) = s * clamp(round(x / s), qmin, qmax)

with zero point 0 (TensorRT's ONNX parser rejects non-zero zero points). Signed grids are
symmetric, [-(2^(b-1) - 1), 2^(b-1) - 1] (the -2^(b-1) code is unused, as TensorRT expects);
unsigned grids are [0, 2^b - 1] (post-ReLU activations, where the target supports them).

Gradients (``fake_quant``): straight-through for rounding, so d q / d x = 1 inside the clipping
range and 0 outside; the scale receives the LSQ gradient round(x/s) - x/s inside and qmin/qmax
outside, which is what lets AdaQuant learn scales.

Range initialisation per tensor or per channel (``axis``): min-max, percentile of |x|, and the
MSE-optimal clipping found by a grid search over clipping ratios.
"""

from __future__ import annotations

from typing import Optional

import torch


FP16 = 16  # a "precision" that keeps a layer in half-precision floating point instead of an integer grid


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (what running the layer in FP16 does to it)."""
    return x.to(torch.float16).to(x.dtype)


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer code range of a symmetric grid."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape)


class _FakeQuant(torch.autograd.Function):
    """q = s * clamp(round(x / s), qmin, qmax) with the module docstring's gradients, written out:
    three passes forward and a masked product backward, where autograd of the composed expression
    (divide, clamp, round, straight-through add, multiply) records and replays twice as many."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: Optional[int]) -> torch.Tensor:
        s = _broadcast(scale, x, axis)
        v = x / s
        codes = torch.round(v).clamp_(qmin, qmax)  # == round(clamp(v)): the bounds are integers
        ctx.save_for_backward(v, codes)
        ctx.qmin, ctx.qmax, ctx.axis, ctx.scale_shape = qmin, qmax, axis, scale.shape
        return codes * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, codes = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:  # LSQ: round(x/s) - x/s inside the range, qmin / qmax outside
            per = grad * torch.where(inside, codes - v, codes)
            if ctx.axis is None or len(ctx.scale_shape) == 0:
                grad_scale = per.sum().reshape(ctx.scale_shape)
            else:
                grad_scale = per.sum([d for d in range(per.ndim) if d != ctx.axis]).reshape(ctx.scale_shape)
        return grad_x, grad_scale, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool = True,
               axis: Optional[int] = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``scale * [qmin..qmax]`` (per-channel along ``axis``)."""
    qmin, qmax = qrange(bits, signed)
    if axis is not None and scale.ndim > 0:
        axis = axis % x.ndim
    return _FakeQuant.apply(x, scale, qmin, qmax, axis)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool = True,
                   axis: Optional[int] = None) -> torch.Tensor:
    """The integer codes of ``x`` (what an engine stores), as int32."""
    qmin, qmax = qrange(bits, signed)
    return torch.clamp(torch.round(x / _broadcast(scale, x, axis)), qmin, qmax).to(torch.int32)


def _absmax(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return x.detach().abs().max()
    return x.detach().abs().transpose(0, axis).reshape(x.shape[axis], -1).max(1).values


def _scale_from_range(r: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    return (r / qrange(bits, signed)[1]).clamp_min(1e-12)


def minmax_scale(x: torch.Tensor, bits: int, signed: bool = True, axis: Optional[int] = None) -> torch.Tensor:
    """Scale whose grid just covers max |x| (per channel along ``axis``)."""
    return _scale_from_range(_absmax(x, axis), bits, signed)


def percentile_scale(x: torch.Tensor, bits: int, percentile: float = 99.99, signed: bool = True,
                     axis: Optional[int] = None, max_samples: int = 1 << 22) -> torch.Tensor:
    """Scale that clips at the given percentile of |x| (per channel along ``axis``; estimated from
    ``max_samples`` random elements of a larger tensor)."""
    a = x.detach().abs().float()
    flat = a.reshape(1, -1) if axis is None else a.transpose(0, axis).reshape(x.shape[axis], -1)
    if flat.shape[1] > max_samples:  # torch.quantile has a size limit, and a seeded sample estimates it well
        idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:max_samples]
        flat = flat[:, idx.to(flat.device)]
    r = torch.quantile(flat, percentile / 100.0, dim=1)
    return _scale_from_range(r if axis is not None else r[0], bits, signed)


def mse_scale(x: torch.Tensor, bits: int, signed: bool = True, axis: Optional[int] = None,
              grid: int = 100, min_ratio: float = 0.2, max_samples: int = 1 << 20) -> torch.Tensor:
    """MSE-optimal clipping: the scale (per channel along ``axis``) among ``grid`` clipping ratios
    in [min_ratio, 1] of max |x| that minimises ||q(x) - x||^2 (per tensor: over at most
    ``max_samples`` elements drawn at random)."""
    x = x.detach().float()
    flat = x.reshape(1, -1) if axis is None else x.transpose(0, axis).reshape(x.shape[axis], -1)
    amax = flat.abs().max(1).values
    if axis is None and flat.shape[1] > max_samples:  # a large activation tensor: the error of a seeded
        # subsample estimates the full error closely, at a fraction of the cost (amax stays exact)
        idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:max_samples]
        flat = flat[:, idx.to(flat.device)]
    qmin, qmax = qrange(bits, signed)
    best_err = torch.full_like(amax, float("inf"))
    best = _scale_from_range(amax, bits, signed)
    for ratio in torch.linspace(min_ratio, 1.0, grid):
        s = _scale_from_range(amax * ratio, bits, signed)
        q = torch.clamp(torch.round(flat / s[:, None]), qmin, qmax) * s[:, None]
        err = (q - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best if axis is not None else best[0]


def export_fake_quant(x: torch.Tensor, scale: float, bits: int, signed: bool) -> torch.Tensor:
    """Per-tensor fake quantization written with the op the ONNX exporter turns into
    QuantizeLinear/DequantizeLinear on an INT8 (UINT8) container; a narrower grid gets an exact Clip
    to its range first."""
    qmin, qmax = qrange(bits, signed)
    lo, hi = (-128, 127) if signed else (0, 255)
    if (qmin, qmax) != (lo, hi):
        x = torch.clamp(x, qmin * scale, qmax * scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, lo, hi)


RANGE_METHODS = {"minmax": minmax_scale, "percentile": percentile_scale, "mse": mse_scale}

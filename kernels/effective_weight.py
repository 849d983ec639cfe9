"""The weight a sparse-training step multiplies with, and the gradient it sends back.

Forward (one pass over W): the N:M mask m of W and   W_eff = W ⊙ (m + (1 − m)·α)
(α = 0: the hard mask of SR-STE and SDGF; 0 < α ≤ 1: MDGF's decayed gradient flow).
Backward: straight-through to the dense W, plus SR-STE's regulariser on the pruned weights:
    ∂L/∂W = g + λ·(1 − m) ⊙ W        (λ = 0 for MDGF and SDGF).
All arithmetic in float32 (float64 for float64 tensors), rounded once to W's dtype, in the kernels
and the references alike.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import Backend, check_groups, use_triton
from .nm_mask import nm_mask_reference


def decayed_weight_reference(w: torch.Tensor, n: int, m: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W ⊙ (m + (1 − m)α), m) for a (rows, K) weight."""
    mask = nm_mask_reference(w, n, m)
    return torch.where(mask, w, (w.to(_accumulator(w)) * alpha).to(w.dtype)), mask


def srste_grad_reference(g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """g + λ (1 − m) ⊙ W."""
    acc = _accumulator(g)
    return (g.to(acc) + lam * (~mask).to(acc) * w.to(acc)).to(g.dtype)


def _accumulator(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # float32, or float64 for float64 tensors


def decayed_weight(w: torch.Tensor, n: int, m: int, alpha: float,
                   backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    check_groups(w, n, m)
    if not use_triton(w, backend):
        return decayed_weight_reference(w, n, m, alpha)
    from .effective_weight_triton import decayed_weight_triton

    return decayed_weight_triton(w, n, m, alpha)


def srste_grad(g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, lam: float,
               backend: Backend = "auto") -> torch.Tensor:
    if not use_triton(g, backend):
        return srste_grad_reference(g, w, mask, lam)
    from .effective_weight_triton import srste_grad_triton

    return srste_grad_triton(g, w, mask, lam)


class _NMWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, n: int, m: int, alpha: float, lam: float, backend: Backend):  # noqa: D102
        w_eff, mask = decayed_weight(w, n, m, alpha, backend)
        ctx.lam, ctx.backend = lam, backend
        if lam:
            ctx.save_for_backward(w, mask)
        ctx.mark_non_differentiable(mask)
        return w_eff, mask

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_mask: Optional[torch.Tensor]):  # noqa: D102
        if ctx.lam:
            w, mask = ctx.saved_tensors
            g = srste_grad(g.contiguous(), w, mask, ctx.lam, ctx.backend)
        return g, None, None, None, None, None


def nm_weight(w: torch.Tensor, n: int, m: int, alpha: float = 0.0, lam: float = 0.0,
              backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (W_eff, mask) of a (rows, K) weight: forward W ⊙ (m + (1 − m)α), backward
    straight-through plus λ(1 − m) ⊙ W. One fused kernel each way on CUDA."""
    return _NMWeight.apply(w, n, m, float(alpha), float(lam), backend)

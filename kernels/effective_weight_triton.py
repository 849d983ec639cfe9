"""Triton kernels for effective_weight.py: the fused mask + decay forward and the SR-STE backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import check_groups, next_power_of_2
from .nm_mask import group_block
from .nm_mask_triton import keep_top_n


@triton.jit
def _decayed_weight_kernel(w_ptr, out_ptr, mask_ptr, num_groups, alpha,
                           N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, MP)
    valid = (g[:, None] < num_groups) & (j[None, :] < M)
    offs = g[:, None].to(tl.int64) * M + j[None, :]
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    keep = keep_top_n(w, j, N, M)
    decayed = (w.to(tl.float32) * alpha).to(w.dtype)
    tl.store(out_ptr + offs, tl.where(keep, w, decayed), mask=valid)
    tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=valid)


@triton.jit
def _srste_grad_kernel(g_ptr, w_ptr, mask_ptr, out_ptr, numel, lam, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    pruned = tl.load(mask_ptr + offs, mask=valid, other=1) == 0
    reg = tl.where(pruned, lam * w, 0.0)
    tl.store(out_ptr + offs, (g.to(tl.float32) + reg).to(g.dtype), mask=valid)


def decayed_weight_triton(w: torch.Tensor, n: int, m: int, alpha: float,
                          out: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W ⊙ (m + (1 − m)α), m) in one pass; ``out``/``mask`` (uint8) may be given to write into."""
    check_groups(w, n, m)
    w = w.contiguous()
    out = torch.empty_like(w) if out is None else out
    mask = torch.empty(w.shape, dtype=torch.uint8, device=w.device) if mask is None else mask
    num_groups = w.numel() // m
    block = group_block(m)
    _decayed_weight_kernel[(triton.cdiv(num_groups, block),)](w, out, mask, num_groups, float(alpha),
                                                              N=n, M=m, MP=next_power_of_2(m), BLOCK_G=block)
    return out, mask.view(torch.bool)


def srste_grad_triton(g: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, lam: float,
                      out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """g + λ (1 − m) ⊙ W in one pass."""
    g, w, mask = g.contiguous(), w.contiguous(), mask.contiguous()
    out = torch.empty_like(g) if out is None else out
    numel = g.numel()
    _srste_grad_kernel[(triton.cdiv(numel, block),)](g, w, mask.view(torch.uint8), out, numel, float(lam), BLOCK=block)
    return out

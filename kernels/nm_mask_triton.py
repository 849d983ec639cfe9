"""Triton kernel for the N:M top-N mask (see nm_mask.py for the rule and the reference)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import check_groups, next_power_of_2


@triton.jit
def keep_top_n(w, j, N: tl.constexpr, M: tl.constexpr):
    """For a (groups, MP) tile of weights (columns j >= M are padding): True where the element is
    among the N largest |w| of its group, ties to the lower index (its rank is below N)."""
    a = tl.abs(w.to(tl.float32))
    ai = a[:, :, None]
    aj = a[:, None, :]
    ii = j[None, :, None]
    jj = j[None, None, :]
    beats = ((aj > ai) | ((aj == ai) & (jj < ii))) & (jj < M)
    return tl.sum(beats.to(tl.int32), axis=2) < N


@triton.jit
def _nm_mask_kernel(w_ptr, out_ptr, num_groups,
                    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, MP)
    valid = (g[:, None] < num_groups) & (j[None, :] < M)
    offs = g[:, None].to(tl.int64) * M + j[None, :]
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, keep_top_n(w, j, N, M).to(tl.uint8), mask=valid)


def nm_mask_triton(w: torch.Tensor, n: int, m: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean N:M mask of a (rows, K) weight. ``out``: a uint8 tensor of w's shape to write into."""
    from .nm_mask import group_block

    check_groups(w, n, m)
    w = w.contiguous()
    if out is None:
        out = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    num_groups = w.numel() // m
    block = group_block(m)
    grid = (triton.cdiv(num_groups, block),)
    _nm_mask_kernel[grid](w, out, num_groups, N=n, M=m, MP=next_power_of_2(m), BLOCK_G=block)
    return out.view(torch.bool)

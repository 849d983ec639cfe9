"""Triton kernel for nm_compress.py: N:M mask, then the kept values and positions, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import check_groups, next_power_of_2
from .nm_mask import group_block
from .nm_mask_triton import keep_top_n


@triton.jit
def _nm_compress_kernel(w_ptr, values_ptr, positions_ptr, num_groups,
                        N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, MP)
    valid = (g[:, None] < num_groups) & (j[None, :] < M)
    w = tl.load(w_ptr + g[:, None].to(tl.int64) * M + j[None, :], mask=valid, other=0.0)
    keep = keep_top_n(w, j, N, M) & valid
    order = tl.cumsum(keep.to(tl.int32), axis=1)  # 1-based order of each kept weight in its group
    gvalid = g < num_groups
    for t in tl.static_range(N):
        chosen = keep & (order == t + 1)
        value = tl.sum(tl.where(chosen, w.to(tl.float32), 0.0), axis=1)
        position = tl.sum(tl.where(chosen, j[None, :], 0), axis=1)
        out = g.to(tl.int64) * N + t
        tl.store(values_ptr + out, value.to(w.dtype), mask=gvalid)
        tl.store(positions_ptr + out, position.to(tl.uint8), mask=gvalid)


def nm_compress_triton(w: torch.Tensor, n: int, m: int, values: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_groups(w, n, m)
    w = w.contiguous()
    rows, k = w.shape
    shape = (rows, k // m * n)
    values = torch.empty(shape, dtype=w.dtype, device=w.device) if values is None else values
    positions = torch.empty(shape, dtype=torch.uint8, device=w.device) if positions is None else positions
    num_groups = w.numel() // m
    block = group_block(m)
    _nm_compress_kernel[(triton.cdiv(num_groups, block),)](w, values, positions, num_groups,
                                                           N=n, M=m, MP=next_power_of_2(m), BLOCK_G=block)
    return values, positions

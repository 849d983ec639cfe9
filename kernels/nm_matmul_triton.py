"""Triton kernel for nm_matmul.py: weight-compressed N:M matmul."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import next_power_of_2
from .nm_matmul import _check


@triton.jit
def _nm_matmul_kernel(x_ptr, values_ptr, positions_ptr, bias_ptr, y_ptr, B, R, G, stride_xb, stride_yb,
                      N: tl.constexpr, M: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.arange(0, M)
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gg = g0 + tl.arange(0, BLOCK_G)
        wmask = (rr[:, None] < R) & (gg[None, :] < G)
        tile = tl.zeros((BLOCK_R, BLOCK_G, M), dtype=tl.float32)
        for t in tl.static_range(N):
            offs = rr[:, None].to(tl.int64) * (G * N) + gg[None, :] * N + t
            v = tl.load(values_ptr + offs, mask=wmask, other=0.0).to(tl.float32)
            p = tl.load(positions_ptr + offs, mask=wmask, other=0).to(tl.int32)
            tile += tl.where(p[:, :, None] == slot[None, None, :], v[:, :, None], 0.0)
        kk = g0 * M + tl.arange(0, BLOCK_G * M)
        x = tl.load(x_ptr + rb[:, None].to(tl.int64) * stride_xb + kk[None, :],
                    mask=(rb[:, None] < B) & (kk[None, :] < G * M), other=0.0)
        w = tl.reshape(tile, (BLOCK_R, BLOCK_G * M)).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rb[:, None].to(tl.int64) * stride_yb + rr[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rb[:, None] < B) & (rr[None, :] < R))


def nm_matmul_triton(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                     bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                     block_b: Optional[int] = None, block_r: Optional[int] = None, block_k: int = 64) -> torch.Tensor:
    """Tiles: batch rows per program (16 at small batch, up to 128), output rows per program (32 at
    small batch — more programs to keep the memory system busy when reading weights is the whole
    cost — else 64), and 64 weight columns per step."""
    rows, kept = values.shape
    if kept % n or m & (m - 1):
        raise ValueError(f"compressed weight {tuple(values.shape)} does not fit {n}:{m} with M a power of two")
    groups = kept // n
    _check(x, groups * m)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, groups * m).contiguous()
    batch = x2.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device) if out is None else out.view(batch, rows)
    block_b = block_b or min(128, max(16, next_power_of_2(batch)))
    block_r = block_r or (32 if batch <= 16 else 64)
    block_g = max(1, block_k // m)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(batch, block_b))
    _nm_matmul_kernel[grid](x2, values.contiguous(), positions.contiguous(), bias if bias is not None else values,
                            y, batch, rows, groups, x2.stride(0), y.stride(0), N=n, M=m, HAS_BIAS=bias is not None,
                            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                            BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_G=block_g)
    return y.reshape(*lead, rows)

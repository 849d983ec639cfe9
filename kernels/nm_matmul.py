"""y = x · Wᵀ (+ bias) with W given compressed (values, positions; see nm_compress.py).

The Triton kernel reads only the kept values and their positions: for 1:8 in fp16 that is 3 bytes
per 8 weights instead of 16, which is the whole game when the matmul is memory-bound (small batch).
It rebuilds each weight tile in registers and multiplies it with ``tl.dot``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Backend, use_triton
from .nm_compress import nm_decompress


def nm_matmul_reference(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear on the decompressed weight, accumulated in float32 (float64 for float64), returned in x's dtype."""
    w = nm_decompress(values, positions, n, m)
    _check(x, w.shape[1])
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(acc), w.to(acc), None if bias is None else bias.to(acc)).to(x.dtype)


def nm_matmul(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
              bias: Optional[torch.Tensor] = None, backend: Backend = "auto") -> torch.Tensor:
    power_of_2 = m & (m - 1) == 0
    if not use_triton(x, backend) or (backend == "auto" and not power_of_2):
        return nm_matmul_reference(x, values, positions, n, m, bias)
    if not power_of_2:
        raise ValueError(f"the Triton N:M matmul needs M a power of two, got M={m}")
    from .nm_matmul_triton import nm_matmul_triton

    return nm_matmul_triton(x, values, positions, n, m, bias)


def _check(x: torch.Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the compressed weight has {k} columns")

"""N:M top-N mask: in every group of M consecutive weights along the reduction dimension keep the N
largest magnitudes. Ties go to the lower index, so the mask is deterministic and the Triton kernel and
the reference agree bit for bit.

Element i of a group is kept iff its rank, #{j : |w_j| > |w_i|  or  (|w_j| = |w_i| and j < i)}, is
below N. The reference gets the same order from a stable descending sort.
"""

from __future__ import annotations

import torch

from .dispatch import Backend, check_groups, next_power_of_2, use_triton


def nm_mask_reference(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of ``w`` (rows, K): per group of ``m`` along K, the ``n`` largest |w| (lower index on ties)."""
    check_groups(w, n, m)
    groups = w.detach().abs().float().reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    return mask.reshape(w.shape)


def nm_mask(w: torch.Tensor, n: int, m: int, backend: Backend = "auto") -> torch.Tensor:
    """N:M mask of a (rows, K) weight; Triton on CUDA (or in the interpreter), the reference elsewhere."""
    check_groups(w, n, m)
    if not use_triton(w, backend):
        return nm_mask_reference(w, n, m)
    from .nm_mask_triton import nm_mask_triton

    return nm_mask_triton(w, n, m)


def group_block(m: int, elements: int = 4096) -> int:
    """Groups per program: about ``elements`` (rank comparisons grow as M^2, so fewer groups for large M)."""
    mp = next_power_of_2(m)
    return max(1, next_power_of_2(max(1, elements // (mp * mp))))

"""Compressed storage of an N:M-sparse (rows, K) weight: per group of M, the N kept values in index
order and their positions inside the group (uint8, 0..M-1). Kept = the N:M mask of the weight, so for a
weight that already satisfies the pattern every non-zero is kept and decompression is exact.

``packed_index_bits`` gives the storage a file needs with positions bit-packed (ceil(log2 M) bits each):
2:4 in fp16 is (2·16 + 2·2)/4 = 9 bits per dense element, 1:8 is (16 + 3)/8 ≈ 2.4.
"""

from __future__ import annotations

import math

import torch

from .dispatch import Backend, check_groups, use_triton
from .nm_mask import nm_mask_reference


def nm_compress_reference(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (rows, K/M·N) in w's dtype, positions (rows, K/M·N) uint8) of the N kept weights per group."""
    check_groups(w, n, m)
    rows = w.shape[0]
    mask = nm_mask_reference(w, n, m).reshape(-1, m)
    position = torch.arange(m, device=w.device).expand_as(mask)
    # kept positions in increasing order: sort keys put kept ones first, in index order
    kept = torch.sort(torch.where(mask, position, position + m), dim=1).values[:, :n]
    values = w.reshape(-1, m).gather(1, kept)
    return values.reshape(rows, -1), kept.to(torch.uint8).reshape(rows, -1)


def nm_decompress(values: torch.Tensor, positions: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense (rows, K) weight back from (values, positions)."""
    rows, kept = values.shape
    if positions.shape != values.shape or kept % n:
        raise ValueError(f"values {tuple(values.shape)} and positions {tuple(positions.shape)} do not form {n}:{m} "
                         "groups")
    dense = torch.zeros(rows * kept // n, m, dtype=values.dtype, device=values.device)
    dense.scatter_(1, positions.reshape(-1, n).long(), values.reshape(-1, n))
    return dense.reshape(rows, kept // n * m)


def nm_compress(w: torch.Tensor, n: int, m: int, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    check_groups(w, n, m)
    if not use_triton(w, backend):
        return nm_compress_reference(w, n, m)
    from .nm_compress_triton import nm_compress_triton

    return nm_compress_triton(w, n, m)


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def packed_index_bits(n: int, m: int, value_bits: int) -> float:
    """Storage bits per dense element with values at ``value_bits`` and positions bit-packed."""
    return n * (value_bits + index_bits(m)) / m


def pack_positions(positions: torch.Tensor, m: int) -> torch.Tensor:
    """Bit-pack positions (each < m) into bytes, ceil(log2 m) bits each, little-endian within a byte stream."""
    bits = index_bits(m)
    p = positions.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=p.device)
    stream = ((p[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream.to(torch.int64) << torch.arange(8, device=p.device)).sum(1).to(torch.uint8)


def unpack_positions(packed: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_positions``: ``count`` positions as uint8."""
    bits = index_bits(m)
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1).to(torch.uint8)

"""2:4 weights in the layout of PyTorch's semi-structured sparse tensors (CUTLASS backend), so a 2:4
model runs on the sparse tensor cores through ``torch.sparse.SparseSemiStructuredTensorCUTLASS``.

From our compressed form (values, positions; nm_compress.py) at 2:4:
- ``packed`` (rows, K/2): the two kept values of each group of 4, in index order — our values as is;
- ``meta``: each group's two positions as a 4-bit code p0 | p1 << 2, four groups per int16 word
  (eight per int32 for int8 weights), lowest group in the lowest bits; the (rows, words) matrix is then
  stored in CUTLASS's ColumnMajorInterleaved<2> order for sparse tensor-core GEMMs: rows permuted inside
  blocks of 32 (16 for int32 words), 2×2 blocks transposed, column pairs interleaved.
"""

from __future__ import annotations

import torch

from .dispatch import Backend
from .nm_compress import nm_compress

_META = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int8: torch.int32}


def meta_layout_index(rows: int, words: int, word_bits: int, device=None) -> torch.Tensor:
    """For each (row, word) of the metadata matrix, in row-major order: its offset in CUTLASS's layout."""
    block, stride = (32, 4) if word_bits == 16 else (16, 2)  # rows per reorder block, its row interleave
    r = torch.arange(rows, device=device)[:, None].expand(rows, words)
    c = torch.arange(words, device=device)[None, :].expand(rows, words)
    dest_r = (r // block) * block + (r % 8) * stride + (r % block) // 8
    # transpose each 2x2 block: (even row, odd col) <-> (odd row, even col)
    up = (dest_r % 2 == 0) & (c % 2 == 1)
    down = (dest_r % 2 == 1) & (c % 2 == 0)
    dest_r = dest_r + up.long() - down.long()
    dest_c = c - up.long() + down.long()
    return ((dest_c // 2) * rows * 2 + dest_r * 2 + dest_c % 2).reshape(-1)


def semi_structured_pack(w: torch.Tensor, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, meta) of a 2:4 (rows, K) weight in fp16/bf16/int8, as PyTorch's CUTLASS path stores them."""
    if w.dtype not in _META:
        raise ValueError(f"2:4 sparse tensor cores take fp16, bf16 or int8 weights, got {w.dtype}")
    meta_dtype = _META[w.dtype]
    word_bits = 16 if meta_dtype == torch.int16 else 32
    per_word = word_bits // 4
    rows, k = w.shape
    block = 32 if word_bits == 16 else 16
    if rows % block or k % (8 * per_word):  # metadata words come in interleaved column pairs
        raise ValueError(f"the CUTLASS 2:4 layout needs rows % {block} == 0 and K % {8 * per_word} == 0, "
                         f"got {rows}x{k}")
    values, positions = nm_compress(w, 2, 4, backend)
    p = positions.to(torch.int64).reshape(rows, k // 4, 2)
    codes = (p[..., 0] | (p[..., 1] << 2)).reshape(rows, -1, per_word)
    words = (codes << (4 * torch.arange(per_word, device=w.device))).sum(-1)
    words = torch.where(words >= 2 ** (word_bits - 1), words - 2**word_bits, words).to(meta_dtype)  # two's complement
    meta = torch.empty(words.numel(), dtype=meta_dtype, device=w.device)
    meta[meta_layout_index(rows, words.shape[1], word_bits, w.device)] = words.reshape(-1)
    return values, meta.reshape(rows, -1)


def to_semi_structured(w: torch.Tensor) -> torch.Tensor:
    """A ``SparseSemiStructuredTensorCUTLASS`` of a 2:4 CUDA weight, built from our packing (F.linear uses it)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    packed, meta = semi_structured_pack(w)
    return SparseSemiStructuredTensorCUTLASS(w.shape, packed=packed, meta=meta, packed_t=None, meta_t=None,
                                             compressed_swizzled_bitmask=None)

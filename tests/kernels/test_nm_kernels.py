"""N:M kernels: references against brute force and closed forms; every Triton kernel against its
reference in Triton's interpreter (CPU), fp32 and fp16, shapes with ragged edges, outputs poisoned
first so that an element the kernel forgot to write shows up."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from deploypipe.kernels.dispatch import check_groups, triton_available, use_triton
from deploypipe.kernels.effective_weight import (decayed_weight_reference, nm_weight, srste_grad_reference)
from deploypipe.kernels.nm_compress import (nm_compress_reference, nm_decompress, pack_positions, packed_index_bits,
                                            unpack_positions)
from deploypipe.kernels.nm_mask import nm_mask_reference
from deploypipe.kernels.nm_matmul import nm_matmul_reference
from deploypipe.kernels.semi_structured import meta_layout_index, semi_structured_pack

PATTERNS = [(2, 4), (1, 4), (2, 8), (1, 8), (1, 16), (1, 32), (3, 8), (2, 6)]
DTYPES = [torch.float32, torch.float16]
interpreted = pytest.mark.skipif(
    not triton_available() or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
    reason="Triton kernels need triton, and a GPU or TRITON_INTERPRET=1 set before triton is imported")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def random_weight(rows: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Normal weights, never zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    w = torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-3), w)
    return w.to(dtype)


def tied_weight(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Small non-zero integers with both signs: many exact ties in |w|."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.randint(1, 4, (rows, k), generator=g).float()
    sign = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def brute_force_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group: among all N-subsets with the largest Σ|w|, the lexicographically first."""
    groups = w.abs().double().reshape(-1, m).tolist()
    out = torch.zeros(len(groups), m, dtype=torch.bool)
    for gi, a in enumerate(groups):
        best, best_sum = None, -1.0
        for subset in itertools.combinations(range(m), n):  # lexicographic order
            s = sum(a[j] for j in subset)
            if s > best_sum:
                best, best_sum = subset, s
        out[gi, list(best)] = True
    return out.reshape(w.shape)


# --------------------------------------------------------------------------- references vs brute force
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (1, 8), (3, 8), (2, 6), (1, 16)])
def test_mask_reference_matches_brute_force(n, m):
    for w in (random_weight(6, 4 * m, seed=n + m), tied_weight(6, 4 * m, seed=n * m)):
        assert torch.equal(nm_mask_reference(w, n, m), brute_force_mask(w, n, m))


def test_mask_keeps_exactly_n_per_group_along_the_reduction_dim():
    w = random_weight(5, 32)
    mask = nm_mask_reference(w, 1, 8)
    assert mask.reshape(5, 4, 8).sum(-1).eq(1).all()
    # a weight that breaks the grouping cannot be masked
    with pytest.raises(ValueError, match="multiple of M=8"):
        check_groups(random_weight(5, 30), 1, 8)
    with pytest.raises(ValueError, match="0 < N < M"):
        check_groups(w, 8, 8)


def test_decayed_weight_reference_closed_form():
    w = random_weight(4, 16)
    mask = nm_mask_reference(w, 2, 8)
    for alpha in (0.0, 0.25, 1.0):
        w_eff, m2 = decayed_weight_reference(w, 2, 8, alpha)
        assert torch.equal(m2, mask)
        torch.testing.assert_close(w_eff, w * (mask.float() + (1 - mask.float()) * alpha), rtol=0, atol=0)


def test_compress_decompress_is_exact_and_positions_pack():
    for n, m in PATTERNS:
        w = random_weight(7, 3 * m, seed=m)
        sparse = w * nm_mask_reference(w, n, m)
        values, positions = nm_compress_reference(sparse, n, m)
        assert values.shape == positions.shape == (7, 3 * n)
        assert torch.equal(nm_decompress(values, positions, n, m), sparse)
        assert positions.reshape(-1, n).diff(dim=1).gt(0).all() if n > 1 else True  # index order
        packed = pack_positions(positions, m)
        assert packed.numel() == -(-positions.numel() * max(1, (m - 1).bit_length()) // 8)
        assert torch.equal(unpack_positions(packed, m, positions.numel()).reshape(positions.shape), positions)
    assert packed_index_bits(2, 4, 16) == 9.0  # 2:4 fp16: 9 bits per dense element


def test_compress_of_a_weight_with_fewer_nonzeros_is_still_exact():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    values, positions = nm_compress_reference(w, 2, 4)
    assert torch.equal(nm_decompress(values, positions, 2, 4), w)


def test_matmul_reference_is_linear_on_the_sparse_weight():
    w = random_weight(9, 32).double()
    x = torch.randn(3, 32, dtype=torch.float64)
    sparse = w * nm_mask_reference(w, 1, 8)
    values, positions = nm_compress_reference(sparse, 1, 8)
    bias = torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(nm_matmul_reference(x, values, positions, 1, 8, bias), x @ sparse.T + bias)


# --------------------------------------------------------------------------- gradients (straight-through)
@pytest.mark.parametrize("alpha,lam", [(0.0, 2e-4), (0.3, 0.0), (0.0, 0.0), (1.0, 0.0)])
def test_nm_weight_gradient_matches_autograd_on_the_formula(alpha, lam):
    w = random_weight(6, 16).double().requires_grad_()
    upstream = torch.randn(6, 16, dtype=torch.float64)
    w_eff, mask = nm_weight(w, 2, 8, alpha, lam)
    (w_eff * upstream).sum().backward()
    ours = w.grad.clone()

    w2 = w.detach().clone().requires_grad_()
    m = nm_mask_reference(w2, 2, 8).double()
    straight_through = w2 + (w2 * (m + (1 - m) * alpha) - w2).detach()  # forward W_eff, backward identity
    loss = (straight_through * upstream).sum() + lam / 2 * ((1 - m) * w2).pow(2).sum()
    loss.backward()
    torch.testing.assert_close(w_eff, straight_through.detach())
    torch.testing.assert_close(ours, w2.grad)
    assert torch.equal(mask, m.bool())


# --------------------------------------------------------------------------- Triton vs reference
SHAPES = [(3, 64), (37, 96), (130, 128)]  # rows × K, group counts not multiples of the block


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_triton_mask_matches_reference(n, m, dtype):
    from deploypipe.kernels.nm_mask_triton import nm_mask_triton

    for rows, k in SHAPES:
        k = k // m * m or m
        for w in (random_weight(rows, k, dtype, seed=rows), tied_weight(rows, k, seed=k).to(dtype)):
            w = w.to(DEVICE)
            out = torch.full(w.shape, 7, dtype=torch.uint8, device=DEVICE)
            mask = nm_mask_triton(w, n, m, out=out)
            assert out.le(1).all(), "an element was not written"
            assert torch.equal(mask.cpu(), nm_mask_reference(w.cpu(), n, m))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (1, 32), (2, 6)])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_triton_decayed_weight_matches_reference(n, m, dtype, alpha):
    from deploypipe.kernels.effective_weight_triton import decayed_weight_triton

    for rows, k in SHAPES:
        k = k // m * m or m
        w = random_weight(rows, k, dtype, seed=k).to(DEVICE)
        out = torch.full_like(w, float("nan"))
        mask_out = torch.full(w.shape, 7, dtype=torch.uint8, device=DEVICE)
        w_eff, mask = decayed_weight_triton(w, n, m, alpha, out=out, mask=mask_out)
        assert not out.isnan().any() and mask_out.le(1).all(), "an element was not written"
        ref_eff, ref_mask = decayed_weight_reference(w.cpu(), n, m, alpha)
        assert torch.equal(mask.cpu(), ref_mask)
        assert torch.equal(w_eff.cpu(), ref_eff)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_srste_grad_matches_reference(dtype):
    from deploypipe.kernels.effective_weight_triton import srste_grad_triton

    for rows, k in [(3, 8), (37, 96), (130, 128)]:  # numel not a multiple of the block
        w = random_weight(rows, k, dtype, seed=1)
        g = random_weight(rows, k, dtype, seed=2)
        mask = nm_mask_reference(w, 2, 8)
        out = torch.full(w.shape, float("nan"), dtype=dtype, device=DEVICE)
        got = srste_grad_triton(g.to(DEVICE), w.to(DEVICE), mask.to(DEVICE), 0.5, out=out, block=256)
        assert not out.isnan().any(), "an element was not written"
        torch.testing.assert_close(got.cpu(), srste_grad_reference(g, w, mask, 0.5),
                                   rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-3 if dtype == torch.float16 else 1e-6)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_triton_compress_matches_reference(n, m, dtype):
    from deploypipe.kernels.nm_compress_triton import nm_compress_triton

    for rows, k in SHAPES:
        k = k // m * m or m
        w = random_weight(rows, k, dtype, seed=m).to(DEVICE)
        shape = (rows, k // m * n)
        values = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        positions = torch.full(shape, 255, dtype=torch.uint8, device=DEVICE)
        nm_compress_triton(w, n, m, values=values, positions=positions)
        assert not values.isnan().any() and positions.lt(m).all(), "an element was not written"
        ref_values, ref_positions = nm_compress_reference(w.cpu(), n, m)
        assert torch.equal(values.cpu(), ref_values) and torch.equal(positions.cpu(), ref_positions)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (2, 8), (1, 16), (1, 32)])
@pytest.mark.parametrize("batch", [1, 5, 19])
def test_triton_matmul_matches_reference(n, m, dtype, batch):
    from deploypipe.kernels.nm_matmul_triton import nm_matmul_triton

    rows, k = 70, 4 * m + 64  # rows and K ragged against the 64-row / 64-column tiles
    w = random_weight(rows, k, seed=batch)
    values, positions = nm_compress_reference(w, n, m)
    x = random_weight(batch, k, seed=batch + 1)
    bias = random_weight(1, rows, seed=3)[0]
    for b in (None, bias):
        out = torch.full((batch, rows), float("nan"), dtype=dtype, device=DEVICE)
        got = nm_matmul_triton(x.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE), positions.to(DEVICE), n, m,
                               None if b is None else b.to(dtype).to(DEVICE), out=out)
        assert not out.isnan().any(), "an element was not written"
        want = nm_matmul_reference(x.to(dtype), values.to(dtype), positions, n, m, None if b is None else b.to(dtype))
        tol = 2e-2 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


@interpreted
def test_triton_backend_dispatches_and_nm_weight_runs_it():
    w = random_weight(16, 32).to(DEVICE).requires_grad_()
    assert use_triton(w, "triton") and not use_triton(w, "reference")
    a, _ = nm_weight(w, 2, 4, 0.2, 1e-3, backend="triton")
    b, _ = nm_weight(w, 2, 4, 0.2, 1e-3, backend="reference")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        use_triton(w, "cuda")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 2:4 semi-structured layout
def _two_four(rows: int, k: int, dtype) -> torch.Tensor:
    w = random_weight(rows, k, seed=rows + k)
    w = w * nm_mask_reference(w, 2, 4)
    if dtype == torch.int8:
        return (w * 40).round().clamp(-127, 127).to(torch.int8)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows,k", [(32, 64), (64, 128), (96, 192)])
def test_semi_structured_pack_equals_pytorch_packing(dtype, rows, k):
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions",
                                      reason="this PyTorch has no CUTLASS 2:4 conversion to compare with")
    if dtype == torch.int8 and rows % 32 == 0 and k % 64:
        pytest.skip("int8 needs K % 64")
    w = _two_four(rows, k, dtype)
    if dtype == torch.int8 and w.eq(0).sum() != w.numel() // 2:
        pytest.skip("a kept int8 weight rounded to zero (PyTorch packs zeros differently)")
    packed, meta = semi_structured_pack(w)
    ref_packed, ref_meta = conversions.sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(packed, ref_packed) and torch.equal(meta, ref_meta)
    assert torch.equal(conversions.sparse_semi_structured_to_dense_cutlass(packed, meta), w)


def test_meta_layout_is_a_permutation():
    for bits, rows, words in [(16, 64, 4), (32, 32, 2)]:
        idx = meta_layout_index(rows, words, bits)
        assert torch.equal(idx.sort().values, torch.arange(rows * words))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse matmuls run on CUDA only (this machine has no GPU)")
def test_semi_structured_tensor_runs_linear_on_gpu():
    from deploypipe.kernels.semi_structured import to_semi_structured

    w = _two_four(128, 128, torch.float16).cuda()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    sparse = to_semi_structured(w)
    torch.testing.assert_close(torch.nn.functional.linear(x, sparse), torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)

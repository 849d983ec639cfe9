"""Quantizers against a float64 reference, the STE/LSQ gradients in closed form, and range search
against brute force."""

import numpy as np
import pytest
import torch

from deploypipe.stages.quantize.quantizer import (fake_quant, minmax_scale, mse_scale, percentile_scale,
                                                  qrange, quantize_codes)


def reference_fake_quant(x: np.ndarray, s: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """float64 reference, element by element."""
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -qmax if signed else 0
    out = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        scale = float(s[idx[0]]) if s.ndim else float(s)
        code = min(max(np.round(float(x[idx]) / scale), qmin), qmax)  # np.round: half to even, as torch
        out[idx] = code * scale
    return out


def test_code_ranges_are_symmetric():
    assert qrange(8) == (-127, 127) and qrange(4) == (-7, 7) and qrange(2) == (-1, 1)
    assert qrange(8, signed=False) == (0, 255)
    with pytest.raises(ValueError):
        qrange(1)


@pytest.mark.parametrize("bits, signed", [(8, True), (4, True), (3, True), (2, True), (4, False)])
def test_fake_quant_matches_float64_reference(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 5, 3, generator=g) * torch.linspace(0.1, 3, 6).view(6, 1, 1)
    s = minmax_scale(x, bits, signed, axis=0) * 0.8  # clip some values too
    ours = fake_quant(x, s, bits, signed, axis=0).double().numpy()
    ref = reference_fake_quant(x.double().numpy(), s.double().numpy(), bits, signed)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    codes = quantize_codes(x, s, bits, signed, axis=0)
    assert codes.min() >= qrange(bits, signed)[0] and codes.max() <= qrange(bits, signed)[1]
    torch.testing.assert_close(codes.float() * s.view(6, 1, 1), torch.from_numpy(ref).float(), rtol=1e-5, atol=1e-6)


def test_per_tensor_grid_has_2b_minus_1_levels():
    x = torch.linspace(-1, 1, 10_001)
    q = fake_quant(x, minmax_scale(x, 4), 4)
    assert len(torch.unique(q)) == 15 and q.abs().max() == pytest.approx(1.0)


def test_ste_and_lsq_gradients_in_closed_form():
    x = torch.tensor([-3.0, -0.74, -0.26, 0.0, 0.31, 0.9, 2.5], requires_grad=True)
    s = torch.tensor(0.25, requires_grad=True)
    bits = 3  # codes -3..3, range +-0.75
    fake_quant(x, s, bits).sum().backward()
    inside = (x.detach() / 0.25).abs() <= 3
    torch.testing.assert_close(x.grad, inside.float())  # straight through inside, zero outside
    v = x.detach() / 0.25
    expected = torch.where(inside, torch.round(v) - v, torch.sign(v) * 3).sum()
    torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_gradients_in_closed_form(axis):
    """The scale of channel c collects sum over its elements of g * (round(v) - v) inside the range and
    g * qmin/qmax outside, v = x / s_c; x gets g inside, 0 outside (float64, numpy reference)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 6, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    channels = x.shape[axis]
    s = (torch.rand(channels, generator=gen, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    g = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    (fake_quant(x, s, 4, axis=axis) * g).sum().backward()
    xs, ss, gs = x.detach().numpy(), s.detach().numpy(), g.numpy()
    shape = [1, 1, 1]
    shape[axis] = channels
    v = xs / ss.reshape(shape)
    inside = np.abs(v) <= 7
    np.testing.assert_allclose(x.grad.numpy(), gs * inside, rtol=0, atol=0)
    per = gs * np.where(inside, np.round(v) - v, np.sign(v) * 7)
    expected = np.moveaxis(per, axis, 0).reshape(channels, -1).sum(1)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_percentile_matches_numpy():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    s = percentile_scale(x, 8, 99.0, axis=0)
    ref = np.percentile(np.abs(x.numpy()), 99.0, axis=1) / 127
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-5)


def test_mse_clipping_is_near_the_brute_force_optimum():
    g = torch.Generator().manual_seed(1)
    # heavy-tailed channels: the MSE-optimal clip is well inside max |x|
    x = torch.randn(4, 4000, generator=g) ** 3
    bits = 4
    s = mse_scale(x, bits, axis=0, grid=100)
    qmin, qmax = qrange(bits)

    def err(scale, row):
        return ((torch.clamp(torch.round(row / scale), qmin, qmax) * scale - row) ** 2).sum().item()

    for c in range(4):
        row = x[c].double()
        candidates = torch.linspace(1e-3, 1.0, 4000, dtype=torch.float64) * row.abs().max() / qmax
        best = min(err(cand, row) for cand in candidates)
        assert err(s[c].double(), row) <= best * 1.02  # within 2% of a 40x finer exhaustive search
        assert err(s[c].double(), row) < err(minmax_scale(x[c], bits).double(), row)  # and beats min-max

"""The one seeding scheme: every (seed, stream, keys) gets its own generator; noise does not depend
on how images are batched; draws of different images are independent."""

from __future__ import annotations

import itertools

import pytest
import torch

from deploypipe.noise import derive_seed, noise_generator, noisy_images


def test_every_seed_and_image_gets_its_own_stream():
    """No two (seed, image) pairs of a 20 x 5,000 grid share a seed — where an affine recipe
    (seed * 1_000_003 + index, the one this replaced) collides as soon as indices pass the multiplier."""
    seeds = {derive_seed(s, "certify", i) for s in range(20) for i in range(5000)}
    assert len(seeds) == 20 * 5000
    assert derive_seed(0, "certify", 1_000_003) != derive_seed(1, "certify", 0)
    assert 0 * 1_000_003 + 1_000_003 == 1 * 1_000_003 + 0  # the affine recipe's collision
    streams = {derive_seed(0, s, 7) for s in ("certify", "drs-right", "train", "evaluate", "calibrate")}
    assert len(streams) == 5  # streams never share noise
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(-1, "x") != derive_seed(2**64 - 1 + 2, "x")  # negative seeds are their own


def test_draws_of_neighbouring_images_and_seeds_are_uncorrelated():
    """Pearson correlation of 10,000-element draws for neighbouring (seed, image) pairs stays within
    5 standard errors (1 / sqrt(n)) of 0; each draw is standard normal (mean, variance)."""
    n = 10_000
    draws = {(s, i): torch.randn(n, generator=noise_generator(s, "certify", i), dtype=torch.float64)
             for s in range(3) for i in range(6)}
    for a, b in itertools.combinations(draws, 2):
        r = torch.corrcoef(torch.stack([draws[a], draws[b]]))[0, 1].item()
        assert abs(r) < 5 / n**0.5, (a, b, r)
    for d in draws.values():
        assert abs(d.mean().item()) < 5 / n**0.5 and d.var().item() == pytest.approx(1.0, abs=0.05)


def test_an_images_noise_does_not_depend_on_its_batch():
    x = torch.rand(10, 3, 4, 4)
    whole = noisy_images(x, 0.5, 3, "evaluate", range(10))
    parts = torch.cat([noisy_images(x[:4], 0.5, 3, "evaluate", range(4)),
                       noisy_images(x[4:], 0.5, 3, "evaluate", range(4, 10))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, noisy_images(x, 0.5, 4, "evaluate", range(10)))  # another seed, other noise
    assert torch.equal(noisy_images(x, 0.0, 3, "evaluate", range(10)), x)
    assert (whole - x).std().item() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="10 images but 9 indices"):
        noisy_images(x, 0.5, 3, "evaluate", range(9))

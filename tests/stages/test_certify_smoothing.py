"""Randomized smoothing math: the Clopper-Pearson bound against scipy's Beta quantile, the binomial
test against scipy, RS and DRS radii against the closed forms of linear two-class classifiers
(never above, approaching as n grows), the wrong-certificate rate over many seeded trials, the
abstention cases, the DRS split/merge bijection and its 2x2 diagonal pattern, and the reference
code's sqrt(a^2 + b^2) DRS radius over-certifying where the sound one does not."""

import math

import pytest
import torch
from scipy import stats

from deploypipe.data import half_image_shape
from deploypipe.bounds import betainc, binom_test_two_sided_half, clopper_pearson_lower
from deploypipe.smoothing import (ABSTAIN, certify, certify_drs, certify_drs_images, certify_images,
                                                 drs_radius, image_generator, merge, predict, rs_radius,
                                                 side_generator, split, vote_counts)


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (7, 10), (10, 10), (12, 100), (100, 100), (50001, 100000),
                                  (99990, 100000), (100000, 100000), (9870, 10000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_equals_scipys_beta_quantile(k, n, alpha):
    ref = 0.0 if k == 0 else stats.beta.ppf(alpha, k, n - k + 1)
    ours = clopper_pearson_lower(k, n, alpha)
    assert ours <= ref + 1e-15  # never above (soundness)
    assert ours == pytest.approx(ref, abs=1e-11)


def test_incomplete_beta_and_binomial_test_against_scipy():
    from scipy.special import betainc as ref

    for a, b, x in [(1, 1, 0.3), (5, 3, 0.7), (0.5, 0.5, 0.2), (50, 50000, 0.001), (99990, 11, 0.9999)]:
        assert betainc(a, b, x) == pytest.approx(ref(a, b, x), rel=1e-8)
    for k, n in [(60, 100), (40, 100), (50, 100), (5000, 9900), (0, 5), (9, 9)]:
        assert binom_test_two_sided_half(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-9)


class Linear2:
    """f(x) = class 1 where w.x + b > 0, else class 0 (flattened images)."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def __call__(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)

    def exact_radius(self, x):  # RS of a linear classifier: the distance to its hyperplane
        return abs(float(x.flatten() @ self.w + self.b)) / float(self.w.norm())

    def margin(self, x, sigma):  # Phi^-1 of the smoothed probability of the predicted class
        return abs(float(x.flatten() @ self.w + self.b)) / (sigma * float(self.w.norm()))


def _linear(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(math.prod(shape), generator=g) * scale
    return Linear2(w, 0.0), torch.rand(shape, generator=g)


def test_rs_radius_never_exceeds_the_exact_radius_and_approaches_it():
    sigma = 0.25
    for seed in range(6):
        f, x = _linear((1, 4, 4), seed)
        f.b = -float(x.flatten() @ f.w) + 0.3 * float(f.w.norm()) * (1 if seed % 2 else -1)  # distance 0.3
        exact = f.exact_radius(x)
        radii = []
        for n in (1_000, 100_000):
            cert = certify(f, x, sigma, 100, n, 0.001, 2, 10_000, image_generator(seed, 0, "cpu"))
            assert cert.prediction == (1 if seed % 2 else 0)
            assert cert.radius <= exact
            radii.append(cert.radius)
        assert radii[0] < radii[1] and radii[1] > 0.9 * exact  # tighter with more samples


def test_drs_radius_never_exceeds_the_exact_radius_of_linear_sides_and_the_reference_formula_does():
    sigma = 0.25
    shape = (1, 4, 4)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(shape, generator=g)
        xl, xr = split(x)
        wl, wr = torch.randn(xl.numel(), generator=g), torch.randn(xr.numel(), generator=g)
        # margins (in units of sigma) a* = 2.0 on the left and b* = 0.5 on the right: very different sides
        left = Linear2(wl, -float(xl.flatten() @ wl) + 2.0 * sigma * float(wl.norm()))
        right = Linear2(wr, -float(xr.flatten() @ wr) + 0.5 * sigma * float(wr.norm()))
        exact = sigma * (2.0 + 0.5) / math.sqrt(2)  # tight for linear sides (see the module docstring)
        cert = certify_drs(left, right, x, sigma, 100, 100_000, 0.001, 2, 10_000, image_generator(seed, 0, "cpu"))
        assert cert.prediction == 1
        assert cert.radius <= exact and cert.radius > 0.9 * exact
        a, b = (stats.norm.ppf(cert.p_lower), stats.norm.ppf(cert.p_lower_right))
        unsound = sigma * math.sqrt(a * a + b * b)  # what the reference implementation reports
        assert unsound > exact  # ... and it certifies beyond where the classifier provably flips


def test_at_matched_noise_drs_of_a_linear_classifiers_halves_certifies_what_rs_does():
    """RS at sigma of f(x) = w.x + beta against DRS at sigma / sqrt(2) of its two halves (w_l.x_l +
    beta_l, w_r.x_r + beta_r, beta_l + beta_r = beta) with |w_l| = |w_r| = u: the exact radii are
    m / (sqrt(2) u) and (m_l / u + m_r / u) / sqrt(2), the same for any split of the margin m. So the
    sound radius gives DRS nothing over RS at matched noise by itself; a gain must come from side
    classifiers more confident at sigma / sqrt(2) than the full one at sigma (README, certify)."""
    sigma = 0.3
    shape = (1, 4, 4)
    for seed, share in [(0, 0.5), (1, 0.8), (2, 0.3)]:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(shape, generator=g)
        xl, xr = split(x)
        wl, wr = torch.randn(xl.numel(), generator=g), torch.randn(xr.numel(), generator=g)
        wr = wr * (wl.norm() / wr.norm())  # balanced halves
        w = merge(wl.reshape(xl.shape), wr.reshape(xr.shape)).flatten()
        assert float(x.flatten() @ w) == pytest.approx(float(xl.flatten() @ wl + xr.flatten() @ wr), rel=1e-5)
        m = 0.35 * float(w.norm())  # margin of the full classifier: exact RS radius 0.35
        ml, mr = share * m, (1 - share) * m
        full = Linear2(w, -float(x.flatten() @ w) + m)
        left = Linear2(wl, -float(xl.flatten() @ wl) + ml)
        right = Linear2(wr, -float(xr.flatten() @ wr) + mr)
        # closed form, through the radius functions the stage uses
        a, b = ml / (sigma / math.sqrt(2) * float(wl.norm())), mr / (sigma / math.sqrt(2) * float(wr.norm()))
        exact_rs = rs_radius(stats.norm.cdf(full.margin(x, sigma)), sigma)
        exact_drs = drs_radius(stats.norm.cdf(a), stats.norm.cdf(b), sigma / math.sqrt(2))
        assert exact_rs == pytest.approx(0.35, rel=1e-6) and exact_drs == pytest.approx(exact_rs, rel=1e-6)
        # and what the certifiers measure (n = 100,000; different noise, so within Monte-Carlo error)
        rs = certify(full, x, sigma, 100, 100_000, 0.001, 2, 10_000, image_generator(seed, 0, "cpu"))
        drs = certify_drs(left, right, x, sigma / math.sqrt(2), 100, 100_000, 0.001, 2, 10_000,
                          image_generator(seed, 0, "cpu"))
        assert rs.prediction == drs.prediction == 1
        assert 0.9 * exact_rs < rs.radius <= exact_rs and 0.9 * exact_rs < drs.radius <= exact_drs
        assert abs(drs.radius - rs.radius) < 0.05 * exact_rs


def test_drs_exact_radius_is_where_the_linear_sides_flip():
    """The closed form used above: moving s*sigma against w_l and t*sigma against w_r with
    s + t = a* + b* makes the two smoothed probabilities sum to exactly 1."""
    a, b = 2.0, 0.5
    r = (a + b) / math.sqrt(2)
    s = t = r / math.sqrt(2)
    assert stats.norm.cdf(a - s) + stats.norm.cdf(b - t) == pytest.approx(1.0)
    assert drs_radius(stats.norm.cdf(a), stats.norm.cdf(b), 1.0) == pytest.approx(r)
    assert drs_radius(stats.norm.cdf(0.3), stats.norm.cdf(-0.3), 1.0) == 0.0  # a + b <= 0: abstain
    assert drs_radius(0.0, 0.99, 1.0) == 0.0


def test_wrong_certificates_stay_below_alpha():
    """A classifier whose smoothed probability of class 0 is exactly Phi(0.2) ~ 0.579: with n = 100
    and alpha = 0.1, certificates claiming more radius than the exact one must be rare (<= alpha)."""
    sigma, alpha, trials = 0.5, 0.1, 400
    f = Linear2(torch.tensor([-1.0]), 0.0)
    x = torch.tensor([[[0.2 * sigma]]])  # w.x + b = -0.1: class 0, margin 0.2 sigma
    exact = f.exact_radius(x)
    wrong = 0
    for t in range(trials):
        cert = certify(f, x, sigma, 10, 100, alpha, 2, 100, image_generator(7, t, "cpu"))
        wrong += cert.prediction != ABSTAIN and (cert.prediction != 0 or cert.radius > exact)
    assert wrong / trials <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_abstention():
    coin = Linear2(torch.tensor([1.0]), 0.0)  # at the boundary: p = 1/2 exactly
    x = torch.zeros(1, 1, 1)
    cert = certify(coin, x, 0.25, 100, 2_000, 0.001, 2, 1_000, image_generator(0, 0, "cpu"))
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    assert predict(coin, x, 0.25, 2_000, 0.001, 2, 1_000, image_generator(0, 1, "cpu")) == ABSTAIN
    sure = Linear2(torch.tensor([1.0]), 5.0)
    assert predict(sure, x, 0.25, 200, 0.001, 2, 1_000, image_generator(0, 2, "cpu")) == 1


def test_split_merge_is_a_bijection_with_the_diagonal_pattern():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    left, right = split(x)
    assert left.shape == right.shape == (2, 3, 4, 3)
    assert half_image_shape((3, 4, 6)) == tuple(left.shape[1:]) and half_image_shape((3, 4, 5)) == (3, 4, 5)
    torch.testing.assert_close(merge(left, right), x, rtol=0, atol=0)
    assert torch.equal(torch.sort(torch.cat([left.flatten(), right.flatten()])).values, torch.sort(x.flatten()).values)
    for i in range(4):
        for j in range(3):  # every 2x2 block: main diagonal left, anti-diagonal right
            assert left[0, 0, i, j] == x[0, 0, i, 2 * j + (i % 2)]
            assert right[0, 0, i, j] == x[0, 0, i, 2 * j + 1 - (i % 2)]
    with pytest.raises(ValueError, match="even image width"):
        split(torch.zeros(1, 3, 3))


def test_noise_depends_only_on_seed_and_image_index():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    x = torch.rand(1, 4, 4, generator=g)
    f = Linear2(w, -float(x.flatten() @ w) + 0.5)  # 0.5 from the boundary: votes split under sigma 0.5 noise
    a = certify(f, x, 0.5, 50, 500, 0.01, 2, 64, image_generator(3, 17, "cpu"))
    b = certify(f, x, 0.5, 50, 500, 0.01, 2, 128, image_generator(3, 17, "cpu"))  # other batch size
    c = certify(f, x, 0.5, 50, 500, 0.01, 2, 64, image_generator(3, 18, "cpu"))
    assert a == b and a != c


class Counting:
    """A linear 10-class classifier that counts its forward passes and the copies it sees."""

    def __init__(self, dim, seed):
        self.w = torch.randn(dim, 10, generator=torch.Generator().manual_seed(seed))
        self.calls, self.largest = 0, 0

    def __call__(self, x):
        self.calls += 1
        self.largest = max(self.largest, x.shape[0])
        return x.flatten(1) @ self.w


def test_several_images_per_pass_give_each_image_its_own_result():
    f = Counting(3 * 4 * 4, 0)
    xs = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    alone = [certify(f, x, 0.3, 20, 80, 0.01, 10, 1000, image_generator(1, i, "cpu")) for i, x in enumerate(xs)]
    f.calls = 0
    packed = certify_images(f, xs, 0.3, 20, 80, 0.01, 10, 1000, [image_generator(1, i, "cpu") for i in range(5)])
    assert packed == alone
    assert f.calls == 1  # 5 x (20 + 80) = 500 copies fit one batch of 1000
    f.calls, f.largest = 0, 0
    certify_images(f, xs, 0.3, 20, 80, 0.01, 10, 250, [image_generator(1, i, "cpu") for i in range(5)])
    # chunks of 20 and 80 copies are packed greedily in order, never split, never beyond the batch size
    assert (f.calls, f.largest) == (3, 220)
    f.calls, f.largest = 0, 0  # the model may see each batch in smaller chunks: the same noise, the same result
    chunked = certify_images(f, xs, 0.3, 20, 80, 0.01, 10, 1000, [image_generator(1, i, "cpu") for i in range(5)],
                             forward_batch=64)
    assert chunked == alone and (f.calls, f.largest) == (8, 64)  # 500 copies: 7 x 64 + 52


def test_smoothed_on_the_cpu_feeds_the_model_small_chunks_by_default_with_the_same_votes():
    from deploypipe.smoothing import CPU_FORWARD_BATCH, Smoothed

    f = Counting(3 * 4 * 4, 2)
    xs = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    auto = Smoothed(f, 10, 0.3, batch_size=1000)
    assert auto.forward_batch == CPU_FORWARD_BATCH  # a callable without parameters runs on the CPU
    chunked = auto.certify_batch(xs, 20, 300, 0.01, indices=[0, 1, 2])
    assert f.largest == CPU_FORWARD_BATCH and auto.predict(xs[0], 300, 0.01, index=0) in range(-1, 10)
    assert f.largest == CPU_FORWARD_BATCH  # PREDICT is chunked too
    f.largest = 0
    whole = Smoothed(f, 10, 0.3, batch_size=1000, forward_batch=None).certify_batch(xs, 20, 300, 0.01,
                                                                                    indices=[0, 1, 2])
    assert f.largest == 3 * 320 and whole == chunked
    with pytest.raises(ValueError, match="forward_batch"):
        Smoothed(f, 10, 0.3, forward_batch=0)


def test_vote_counts_are_exact_counts_of_the_noisy_predictions():
    f = Counting(2 * 2 * 2, 3)
    x = torch.rand(2, 2, 2)
    counts = vote_counts(f, [(x, 37, image_generator(0, 0, "cpu")), (x, 5, image_generator(0, 1, "cpu"))], 0.5, 10, 16)
    g0, g1 = image_generator(0, 0, "cpu"), image_generator(0, 1, "cpu")
    for row, (g, num) in zip(counts, [(g0, 37), (g1, 5)]):
        noise = torch.cat([torch.randn((b, 2, 2, 2), generator=g) * 0.5 for b in ([16, 16, 5] if num == 37 else [5])])
        brute = torch.bincount(f(x.unsqueeze(0) + noise).argmax(1), minlength=10)
        assert torch.equal(row, brute)
    assert int(counts.sum()) == 42


def test_drs_sides_of_one_model_in_one_pass_equal_two_separate_models():
    f = Counting(3 * 4 * 2, 1)
    g = Counting(3 * 4 * 2, 1)  # same weights, another object: two passes
    xs = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    one = certify_drs_images(f, f, xs, 0.4, 10, 60, 0.01, 10, 1000, [image_generator(2, i, "cpu") for i in range(3)])
    assert f.calls == 1
    two = certify_drs_images(g, Counting(3 * 4 * 2, 1), xs, 0.4, 10, 60, 0.01, 10, 1000,
                             [image_generator(2, i, "cpu") for i in range(3)])
    assert one == two
    assert one == [certify_drs(f, f, x, 0.4, 10, 60, 0.01, 10, 1000, image_generator(2, i, "cpu")) for i, x in enumerate(xs)]


def test_a_classifier_with_more_outputs_than_classes_is_refused_not_miscounted():
    f = Counting(2 * 2 * 2, 0)  # 10 logits, but the data would have 9 classes
    x = torch.rand(2, 2, 2)
    with pytest.raises(ValueError, match=r"expected \(32, 9\)"):
        vote_counts(f, [(x, 16, image_generator(0, 0, "cpu")), (x, 16, image_generator(0, 1, "cpu"))], 0.5, 9, 32)


def test_the_right_sides_noise_is_no_images_left_noise():
    # the right side's seed is derived by a 64-bit mix, not an affine map that lands on other images' seeds
    for seed in range(4):
        lefts = {image_generator(seed, i, "cpu").initial_seed() for i in range(20_000)}
        rights = {side_generator(image_generator(seed, i, "cpu")).initial_seed() for i in range(20_000)}
        assert len(rights) == 20_000 and not lefts & rights

"""Exact binomial statistics for randomized smoothing, in float64, without scipy.

- ``betainc(a, b, x)``: the regularized incomplete beta function I_x(a, b), by its continued fraction
  (modified Lentz), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges
  slowly.
- ``binom_sf(k, n, p)`` = P(Bin(n, p) >= k) = I_p(k, n - k + 1).
- ``clopper_pearson_lower(k, n, alpha)``: the one-sided (1 - alpha) lower confidence bound on a
  binomial proportion, i.e. the p with P(Bin(n, p) >= k) = alpha — the alpha quantile of
  Beta(k, n - k + 1) — found by bisection on the monotone tail (0 when k = 0).
  Cohen et al. call it as ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.
- ``binom_test_two_sided_half(k, n)``: the p-value of the two-sided exact test of p = 1/2 given k
  successes of n (PREDICT's abstention test).
"""

from __future__ import annotations

import math

SAFETY = 1e-12  # subtracted from the lower bound: covers float64 error of the tail (measured < 1e-13 vs scipy)


def _log_front(a: float, b: float, x: float) -> float:
    return (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))


def _continued_fraction(a: float, b: float, x: float, max_iter: int = 100_000, eps: float = 1e-16) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(_log_front(a, b, x)) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(_log_front(a, b, x)) * _continued_fraction(b, a, 1.0 - x) / b


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Bin(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return betainc(k, n - k + 1, p)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0  # binom_sf(k, n, p) increases with p; find where it crosses alpha
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if binom_sf(k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return max(0.0, lo - SAFETY)


def binom_test_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of H0: p = 1/2 with k successes of n (symmetric null: twice the
    smaller tail, capped at 1)."""
    if n <= 0:
        return 1.0
    small = min(k, n - k)
    tail = 1.0 - binom_sf(small + 1, n, 0.5)  # P(X <= small)
    return min(1.0, 2.0 * tail)

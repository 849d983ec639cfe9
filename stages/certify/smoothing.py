"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) and dual randomized smoothing (Xia et al.
2024), with sound radii.

RS. The smoothed classifier is g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I), the noise
added to the [0, 1] image before the model's own normalisation, in float32.
- ``certify``: the class with the most votes among n0 noisy copies is the candidate c; n fresh
  copies give k votes for c; p_lower is the one-sided Clopper-Pearson bound at level alpha. If
  p_lower > 1/2 the prediction c is certified within the L2 radius sigma * Phi^-1(p_lower),
  otherwise abstain.
- ``predict``: the top two classes of n votes; abstain unless the two-sided binomial test rejects
  "they are equally likely" at level alpha.

DRS. ``split`` cuts a C x H x W image into two C x H x (W/2) sub-images: in every 2 x 2 block the
main diagonal goes left and the anti-diagonal right (so each row alternates which of its pixel pair
goes where). Each side is smoothed with its own base classifier at the same sigma; the prediction is
the argmax of the summed votes.

Why the DRS radius is sigma * (a + b) / sqrt(2), not sqrt(R_l^2 + R_r^2). Let p_l, p_r be the two
sides' probabilities of the predicted class c, with lower bounds p_l >= Phi(a), p_r >= Phi(b), each
holding with probability 1 - alpha/2 (so both hold with probability 1 - alpha). The split is a
partition of the pixels, so a perturbation delta splits into (delta_l, delta_r) with
|delta_l|^2 + |delta_r|^2 = |delta|^2. Cohen et al.'s Lipschitz argument gives, for each side,
p_l(x_l + delta_l) >= Phi(a - |delta_l| / sigma), likewise for the right. Every other class c' has
summed probability at most (1 - p_l) + (1 - p_r), so c stays the argmax while p_l + p_r > 1, which
holds for all perturbations with Phi(a - s) + Phi(b - t) > 1, i.e. a - s > t - b, i.e. s + t < a + b,
where s = |delta_l| / sigma and t = |delta_r| / sigma. Over the sphere s^2 + t^2 = (r / sigma)^2 the
largest s + t is sqrt(2) r / sigma, so the prediction is certified for r < sigma (a + b) / sqrt(2).
With a = b this is sqrt(2) sigma Phi^-1(p_lower), the familiar sqrt(2) gain; when the sides differ
it is smaller than sqrt(R_l^2 + R_r^2) = sigma sqrt(a^2 + b^2), which the reference code reports
and which over-certifies (for linear sides, where the bound is tight, it exceeds the exact radius).
Abstain when a + b <= 0.

Speed: noise and votes stay on the model's device (one host sync per image), batches of
``batch_size`` noisy copies, ``torch.inference_mode``; noise is drawn from a generator seeded by
(seed, image index), so any shard of the test set reproduces the unsharded result exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from deploypipe.data import diagonal_merge as merge  # noqa: F401  (re-exported: the DRS pair)
from deploypipe.data import diagonal_split as split

from .bounds import binom_test_two_sided_half, clopper_pearson_lower

ABSTAIN = -1
Classifier = Callable[[torch.Tensor], torch.Tensor]  # batch of images in [0, 1] -> logits


def norm_ppf(p: float) -> float:
    """Phi^-1(p) in float64."""
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def image_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The noise source of one image: depends only on (seed, image index), not on the shard."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    return g


@torch.inference_mode()
def sample_counts(model: Classifier, x: torch.Tensor, num: int, sigma: float, num_classes: int,
                  batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Votes of ``model`` over ``num`` Gaussian-noised copies of one image ``x`` (C x H x W, float32
    in [0, 1]); a LongTensor of ``num_classes`` counts on x's device."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    x = x.float()
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        noise = torch.randn((b, *x.shape), generator=generator, device=x.device, dtype=torch.float32) * sigma
        pred = model(x.unsqueeze(0) + noise).argmax(1)
        counts += torch.bincount(pred, minlength=num_classes)
        remaining -= b
    return counts


@dataclass(frozen=True)
class Certificate:
    prediction: int      # ABSTAIN (-1) or the class
    radius: float        # 0.0 when abstaining
    p_lower: float       # RS: the bound on the top class; DRS: left side's
    p_lower_right: Optional[float] = None  # DRS only


def rs_radius(p_lower: float, sigma: float) -> float:
    return sigma * norm_ppf(p_lower) if p_lower > 0.5 else 0.0


def certify(model: Classifier, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator) -> Certificate:
    """Cohen et al.'s CERTIFY for one image."""
    c = int(sample_counts(model, x, n0, sigma, num_classes, batch_size, generator).argmax())
    k = int(sample_counts(model, x, n, sigma, num_classes, batch_size, generator)[c])
    p = clopper_pearson_lower(k, n, alpha)
    if p <= 0.5:
        return Certificate(ABSTAIN, 0.0, p)
    return Certificate(c, rs_radius(p, sigma), p)


def predict(model: Classifier, x: torch.Tensor, sigma: float, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator) -> int:
    """Cohen et al.'s PREDICT for one image: the top class, or ABSTAIN."""
    counts = sample_counts(model, x, n, sigma, num_classes, batch_size, generator)
    top2 = counts.topk(2)
    k1, k2 = int(top2.values[0]), int(top2.values[1])
    if binom_test_two_sided_half(k1, k1 + k2) > alpha:
        return ABSTAIN
    return int(top2.indices[0])


# --------------------------------------------------------------------------- DRS
def drs_radius(p_left: float, p_right: float, sigma: float) -> float:
    """The sound DRS radius sigma (a + b) / sqrt(2), a = Phi^-1(p_left), b = Phi^-1(p_right); 0 when
    a + b <= 0 (abstain)."""
    a = norm_ppf(p_left) if p_left > 0 else -math.inf
    b = norm_ppf(p_right) if p_right > 0 else -math.inf
    return sigma * (a + b) / math.sqrt(2) if a + b > 0 else 0.0


def certify_drs(left_model: Classifier, right_model: Classifier, x: torch.Tensor, sigma: float, n0: int, n: int,
                alpha: float, num_classes: int, batch_size: int, generator: torch.Generator) -> Certificate:
    """DRS CERTIFY for one image: candidate = argmax of the summed selection votes; each side's
    lower bound at alpha / 2; the sound radius."""
    xl, xr = split(x)
    sel = (sample_counts(left_model, xl, n0, sigma, num_classes, batch_size, generator)
           + sample_counts(right_model, xr, n0, sigma, num_classes, batch_size, generator))
    c = int(sel.argmax())
    kl = int(sample_counts(left_model, xl, n, sigma, num_classes, batch_size, generator)[c])
    kr = int(sample_counts(right_model, xr, n, sigma, num_classes, batch_size, generator)[c])
    pl, pr = clopper_pearson_lower(kl, n, alpha / 2), clopper_pearson_lower(kr, n, alpha / 2)
    radius = drs_radius(pl, pr, sigma)
    if radius <= 0:
        return Certificate(ABSTAIN, 0.0, pl, pr)
    return Certificate(c, radius, pl, pr)

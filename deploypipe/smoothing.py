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
Abstain when a + b <= 0. At matched noise (DRS at sigma / sqrt(2) against RS at sigma) the sound
radius is no gain by itself: for a linear classifier w.x + beta and its two halves with |w_l| = |w_r|,
both certify the distance to its hyperplane. DRS gains only where its side classifiers are more
confident at sigma / sqrt(2) than the full-image one at sigma.

Speed: noise and votes stay on the model's device, with one host sync per image (per group of
images when several share the forward passes: n0 + n small against ``batch_size``); batches of
``batch_size`` noisy copies, ``torch.inference_mode``; both DRS sides in the same passes when they
share the model. Noise is drawn from ``noise_generator(seed, "certify", image index)``
(deploypipe.noise), in chunks that do not depend on the packing, so any shard or grouping of the
test set reproduces the unsharded result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from deploypipe.data import diagonal_merge as merge  # noqa: F401  (re-exported: the DRS pair)
from deploypipe.data import diagonal_split as split
from deploypipe.noise import gaussian, noise_generator

from deploypipe.bounds import binom_test_two_sided_half, clopper_pearson_lower

ABSTAIN = -1
CPU_FORWARD_BATCH = 64  # a CPU runs small networks faster on chunks that stay in its caches (2-3x at 1000 copies)
Classifier = Callable[[torch.Tensor], torch.Tensor]  # batch of images in [0, 1] -> logits


def norm_ppf(p: float) -> float:
    """Phi^-1(p) in float64."""
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def image_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The noise source of one image: depends only on (seed, image index), not on the shard."""
    return noise_generator(seed, "certify", index, device=device)


def side_generator(generator: torch.Generator) -> torch.Generator:
    """DRS: the right side's own noise source, derived from the image's (no device sync), so each
    side's noise is the same whether the sides run in one forward pass or two."""
    return noise_generator(generator.initial_seed(), "drs-right", device=generator.device)


Job = tuple[torch.Tensor, int, torch.Generator]  # (image C x H x W, noisy copies, its noise source)


@torch.inference_mode()
def vote_counts(model: Classifier, jobs: list[Job], sigma: float, num_classes: int, batch_size: int,
                forward_batch: Optional[int] = None) -> torch.Tensor:
    """Votes of ``model`` for each job (image, count, generator): a (jobs x num_classes) LongTensor on
    the images' device, with no host sync.

    Each job's noise is drawn from its own generator in chunks of min(batch_size, remaining), so it
    does not depend on which other jobs share a forward pass; chunks of several jobs (several images
    when n is small, or both DRS sides of a shared model) are packed into one batch of at most
    ``batch_size`` noisy copies. Noise and x + noise are float32. ``forward_batch``: the model sees each
    batch in chunks of at most this many (a CPU runs a small network faster on batches that stay in its
    caches); the noise does not depend on it."""
    device = jobs[0][0].device
    counts = torch.zeros(len(jobs) * num_classes, dtype=torch.long, device=device)
    pending: list[tuple[torch.Tensor, int]] = []
    filled = 0

    def flush() -> None:
        nonlocal filled
        if not pending:
            return
        batch = pending[0][0] if len(pending) == 1 else torch.cat([b for b, _ in pending])
        if forward_batch and batch.shape[0] > forward_batch:
            logits = torch.cat([model(chunk) for chunk in batch.split(forward_batch)])
        else:
            logits = model(batch)
        if logits.dim() != 2 or logits.shape[0] != batch.shape[0] or logits.shape[1] != num_classes:
            # a wider output would spill votes into the next job's counts (an unsound radius)
            raise ValueError(f"the base classifier returned logits of shape {tuple(logits.shape)} for "
                             f"{batch.shape[0]} inputs, expected ({batch.shape[0]}, {num_classes})")
        pred = logits.argmax(1)
        if len(pending) == 1:
            slot = pending[0][1] * num_classes + pred
        else:
            owner = torch.cat([torch.full((b.shape[0],), j * num_classes, dtype=torch.long, device=device)
                               for b, j in pending])
            slot = owner + pred
        counts.index_add_(0, slot, torch.ones_like(slot))  # no host sync (CUDA bincount reads min/max)
        pending.clear()
        filled = 0

    for j, (x, num, generator) in enumerate(jobs):
        x = x.float()
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            if filled + b > batch_size:
                flush()
            noise = gaussian((b, *x.shape), sigma, generator)
            pending.append((x.unsqueeze(0) + noise, j))
            filled += b
            remaining -= b
    flush()
    return counts.view(len(jobs), num_classes)


def sample_counts(model: Classifier, x: torch.Tensor, num: int, sigma: float, num_classes: int,
                  batch_size: int, generator: torch.Generator, forward_batch: Optional[int] = None) -> torch.Tensor:
    """Votes of ``model`` over ``num`` Gaussian-noised copies of one image ``x`` (C x H x W, float32
    in [0, 1]); a LongTensor of ``num_classes`` counts on x's device."""
    return vote_counts(model, [(x, num, generator)], sigma, num_classes, batch_size, forward_batch)[0]


@dataclass(frozen=True)
class Certificate:
    prediction: int      # ABSTAIN (-1) or the class
    radius: float        # 0.0 when abstaining
    p_lower: float       # RS: the bound on the top class; DRS: left side's
    p_lower_right: Optional[float] = None  # DRS only
    count: int = 0       # votes for the candidate class among the n estimation copies (left side for DRS)
    count_right: Optional[int] = None  # DRS only


def rs_radius(p_lower: float, sigma: float) -> float:
    return sigma * norm_ppf(p_lower) if p_lower > 0.5 else 0.0


def certify_images(model: Classifier, images: list[torch.Tensor], sigma: float, n0: int, n: int, alpha: float,
                   num_classes: int, batch_size: int, generators: list[torch.Generator],
                   forward_batch: Optional[int] = None) -> list[Certificate]:
    """Cohen et al.'s CERTIFY for several images at once (one forward pass holds several images when
    n0 + n is small against the batch size) and one host sync for all of them. Per image: the n0
    selection copies come first from its generator, then the n estimation copies, so each result is
    the one ``certify`` gives for that image alone."""
    jobs = [job for x, g in zip(images, generators) for job in ((x, n0, g), (x, n, g))]
    counts = vote_counts(model, jobs, sigma, num_classes, batch_size, forward_batch)
    top = counts[0::2].argmax(1)
    k = counts[1::2].gather(1, top[:, None])[:, 0]
    out = []
    for c, kc in zip(*torch.stack([top, k]).tolist()):  # the one host sync
        p = clopper_pearson_lower(kc, n, alpha)
        out.append(Certificate(ABSTAIN, 0.0, p, count=kc) if p <= 0.5
                   else Certificate(c, rs_radius(p, sigma), p, count=kc))
    return out


def certify(model: Classifier, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator, forward_batch: Optional[int] = None) -> Certificate:
    """Cohen et al.'s CERTIFY for one image."""
    return certify_images(model, [x], sigma, n0, n, alpha, num_classes, batch_size, [generator], forward_batch)[0]


def predict(model: Classifier, x: torch.Tensor, sigma: float, n: int, alpha: float, num_classes: int,
            batch_size: int, generator: torch.Generator, forward_batch: Optional[int] = None) -> int:
    """Cohen et al.'s PREDICT for one image: the top class, or ABSTAIN."""
    counts = sample_counts(model, x, n, sigma, num_classes, batch_size, generator, forward_batch)
    top2 = counts.topk(2)
    (k1, k2), (c1, _) = top2.values.tolist(), top2.indices.tolist()
    if binom_test_two_sided_half(k1, k1 + k2) > alpha:
        return ABSTAIN
    return int(c1)


# --------------------------------------------------------------------------- DRS
def drs_radius(p_left: float, p_right: float, sigma: float) -> float:
    """The sound DRS radius sigma (a + b) / sqrt(2), a = Phi^-1(p_left), b = Phi^-1(p_right); 0 when
    a + b <= 0 (abstain)."""
    a = norm_ppf(p_left) if p_left > 0 else -math.inf
    b = norm_ppf(p_right) if p_right > 0 else -math.inf
    return sigma * (a + b) / math.sqrt(2) if a + b > 0 else 0.0


def certify_drs_images(left_model: Classifier, right_model: Classifier, images: list[torch.Tensor], sigma: float,
                       n0: int, n: int, alpha: float, num_classes: int, batch_size: int,
                       generators: list[torch.Generator], forward_batch: Optional[int] = None) -> list[Certificate]:
    """DRS CERTIFY for several images: candidate = argmax of the summed selection votes of the two
    sides; each side's lower bound at alpha / 2; the sound radius. When both sides are the same
    model, both halves go through it in the same forward passes. The left half's noise comes from the
    image's generator, the right half's from ``side_generator`` of it."""
    halves = [split(x) for x in images]
    left_jobs = [job for (xl, _), g in zip(halves, generators) for job in ((xl, n0, g), (xl, n, g))]
    right_gens = [side_generator(g) for g in generators]
    right_jobs = [job for (_, xr), g in zip(halves, right_gens) for job in ((xr, n0, g), (xr, n, g))]
    if left_model is right_model:
        both = vote_counts(left_model, left_jobs + right_jobs, sigma, num_classes, batch_size, forward_batch)
        left, right = both[:len(left_jobs)], both[len(left_jobs):]
    else:
        left = vote_counts(left_model, left_jobs, sigma, num_classes, batch_size, forward_batch)
        right = vote_counts(right_model, right_jobs, sigma, num_classes, batch_size, forward_batch)
    top = (left[0::2] + right[0::2]).argmax(1)
    kl = left[1::2].gather(1, top[:, None])[:, 0]
    kr = right[1::2].gather(1, top[:, None])[:, 0]
    out = []
    for c, a, b in zip(*torch.stack([top, kl, kr]).tolist()):  # the one host sync
        pl, pr = clopper_pearson_lower(a, n, alpha / 2), clopper_pearson_lower(b, n, alpha / 2)
        radius = drs_radius(pl, pr, sigma)
        out.append(Certificate(c if radius > 0 else ABSTAIN, radius, pl, pr, a, b))  # drs_radius is 0 when abstaining
    return out


def certify_drs(left_model: Classifier, right_model: Classifier, x: torch.Tensor, sigma: float, n0: int, n: int,
                alpha: float, num_classes: int, batch_size: int, generator: torch.Generator,
                forward_batch: Optional[int] = None) -> Certificate:
    """DRS CERTIFY for one image (see ``certify_drs_images``)."""
    return certify_drs_images(left_model, right_model, [x], sigma, n0, n, alpha, num_classes, batch_size,
                              [generator], forward_batch)[0]


# --------------------------------------------------------------------------- the smoothed classifiers
def _device_of(classifier: Classifier) -> torch.device:
    params = getattr(classifier, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


class Smoothed:
    """Cohen et al.'s smoothed classifier g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I).

    ``classifier`` maps a batch of [0, 1] images (N x C x H x W, float32) to logits (N x num_classes):
    a PyTorch module (its device is used) or any callable, e.g. an ONNX Runtime session wrapper.
    Image ``index``'s noise comes from ``noise_generator(seed, "certify", index)``; without an index,
    calls take the next unused one, so a loop over images draws fresh noise for each.
    ``forward_batch`` "auto": the model sees each step's ``batch_size`` copies in chunks of
    ``CPU_FORWARD_BATCH`` on the CPU and whole on other devices (None: always whole); the noise, and so
    the votes, do not depend on it.

    >>> import torch
    >>> from deploypipe import Smoothed
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    >>> smoothed = Smoothed(net, num_classes=10, sigma=0.25)
    >>> x = torch.rand(3, 8, 8)
    >>> cert = smoothed.certify(x, n0=100, n=1_000, alpha=0.001)
    >>> cert.prediction in range(-1, 10) and cert.radius >= 0
    True
    """

    def __init__(self, classifier: Classifier, num_classes: int, sigma: float, *, batch_size: int = 1000,
                 forward_batch: Optional[int] | str = "auto", seed: int = 0,
                 device: Optional[torch.device | str] = None):
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma} — fix: give the noise level the classifier was trained "
                             "for")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.classifier, self.num_classes, self.sigma = classifier, num_classes, sigma
        self.device = torch.device(device) if device is not None else _device_of(classifier)
        if forward_batch == "auto":
            forward_batch = CPU_FORWARD_BATCH if self.device.type == "cpu" else None
        elif forward_batch is not None and (isinstance(forward_batch, str) or forward_batch < 1):
            raise ValueError(f"forward_batch must be a positive number of copies, None or 'auto', "
                             f"got {forward_batch!r}")
        self.batch_size, self.forward_batch, self.seed = batch_size, forward_batch, seed
        self._next = 0

    def _indices(self, count: int, indices: Optional[list[int]]) -> list[int]:
        if indices is None:
            indices = list(range(self._next, self._next + count))
            self._next += count
        if len(indices) != count:
            raise ValueError(f"{count} images but {len(indices)} indices")
        return list(indices)

    def _generators(self, indices: list[int]) -> list[torch.Generator]:
        return [image_generator(self.seed, i, self.device) for i in indices]

    def _images(self, images) -> list[torch.Tensor]:
        xs = list(images) if not isinstance(images, torch.Tensor) or images.dim() == 4 else [images]
        return [x.to(self.device) for x in xs]

    def certify_batch(self, images, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      indices: Optional[list[int]] = None) -> list[Certificate]:
        """CERTIFY for several images (a list of C x H x W tensors, or an N x C x H x W tensor)."""
        _check_counts(n0, n, alpha)
        xs = self._images(images)
        gens = self._generators(self._indices(len(xs), indices))
        return certify_images(self.classifier, xs, self.sigma, n0, n, alpha, self.num_classes, self.batch_size, gens,
                              self.forward_batch)

    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                index: Optional[int] = None) -> Certificate:
        """CERTIFY one C x H x W image: the prediction (or ABSTAIN) and its L2 radius, which holds
        with probability at least 1 - alpha."""
        return self.certify_batch([x], n0, n, alpha, None if index is None else [index])[0]

    def predict(self, x: torch.Tensor, n: int = 10_000, alpha: float = 0.001, index: Optional[int] = None) -> int:
        """PREDICT: the top class of n noisy votes, or ABSTAIN when the two-sided binomial test cannot
        tell it from the runner-up at level alpha."""
        _check_counts(1, n, alpha)
        (i,) = self._indices(1, None if index is None else [index])
        return predict(self.classifier, x.to(self.device), self.sigma, n, alpha, self.num_classes, self.batch_size,
                       image_generator(self.seed, i, self.device), self.forward_batch)


class DualSmoothed(Smoothed):
    """Dual randomized smoothing (Xia et al. 2024): the image is split into two C x H x W/2 halves
    (``split``), each smoothed by its own base classifier at ``sigma``; the prediction is the argmax of
    the summed votes, certified with the sound radius sigma (a + b) / sqrt(2), each side's bound at
    alpha / 2. ``right`` None: one classifier serves both halves.

    >>> import torch
    >>> from deploypipe import DualSmoothed
    >>> side = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 4, 10)).eval()
    >>> drs = DualSmoothed(side, num_classes=10, sigma=0.18)
    >>> drs.certify(torch.rand(3, 8, 8), n0=100, n=1_000).radius >= 0
    True
    """

    def __init__(self, left: Classifier, num_classes: int, sigma: float, right: Optional[Classifier] = None,
                 **kwargs):
        super().__init__(left, num_classes, sigma, **kwargs)
        self.right = left if right is None else right

    def certify_batch(self, images, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      indices: Optional[list[int]] = None) -> list[Certificate]:
        _check_counts(n0, n, alpha)
        xs = self._images(images)
        if any(x.shape[-1] % 2 for x in xs):
            raise ValueError("DRS needs an even image width — fix: resize the images or use Smoothed (RS)")
        gens = self._generators(self._indices(len(xs), indices))
        return certify_drs_images(self.classifier, self.right, xs, self.sigma, n0, n, alpha, self.num_classes,
                                  self.batch_size, gens, self.forward_batch)

    def predict(self, x: torch.Tensor, n: int = 10_000, alpha: float = 0.001, index: Optional[int] = None) -> int:
        """The certified prediction at radius 0 (n0 = 100 selection votes, then n per side), ABSTAIN
        where DRS cannot certify any radius: a sound PREDICT for the summed-vote classifier."""
        return self.certify(x, 100, n, alpha, index).prediction


def _check_counts(n0: int, n: int, alpha: float) -> None:
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be at least 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

"""Robustness-aware bit allocation: keep the certified robustness of the shipped model.

The integer program chooses precisions from per-layer loss deltas (mixed_precision.py). With
``sensitivity noisy`` those deltas are measured on Gaussian-noised calibration images at the
certification sigma, so they describe what randomized smoothing feeds the base classifier; with
``sensitivity votes`` each delta is the drop of the FP top class's vote probability over several noisy
copies of each calibration image (``VoteLoss``), the quantity the certificate's bound is taken on. A
certified constraint goes further: the assembled model is certified (Cohen et al.'s CERTIFY,
deploypipe.smoothing) on a held-out *selection* subset of the training data — never the test split —
and compared with the FP model certified on the same images with the same noise:

- ``max_acr_loss D``: ACR(FP) - ACR(quantized) <= D;
- ``min_certified_accuracy R:A``: certified accuracy at radius R >= A.

``deficit`` is how far a model is from the constraint (<= 0: it holds). The search over the budget
(in the user's unit: fraction of the FP32 size or BOPs, average bits, ms) starts at the user's
budget. If that model violates the constraint, the largest model the candidates allow (every layer at
its costliest precision) is certified: if it violates too, no choice can meet the constraint and the
search stops with its deficit (the smallest achievable). Otherwise the next budget is where the line
through the closest violating and satisfying (budget, deficit) pairs crosses zero (the measured
relation), re-solved with the program; a solution identical to one already certified moves the
budget halfway to the satisfying one. At most ``max_rounds`` models are certified; the smallest one
that satisfies the constraint is returned — never one that violates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from deploypipe.smoothing import ABSTAIN, Smoothed

REPORT_RADII = (0.25, 0.5)  # certified accuracies every round reports


@dataclass(frozen=True)
class Robustness:
    """Certificates of one model on the selection subset: per image, correct (certified and the true
    class) and the radius (0 when abstaining)."""

    correct: tuple[bool, ...]
    radius: tuple[float, ...]

    def acr(self) -> float:
        """Average certified radius: the radius when correct, 0 otherwise, averaged over all images."""
        return sum(r for c, r in zip(self.correct, self.radius) if c) / max(len(self.radius), 1)

    def certified_accuracy(self, r: float) -> float:
        """The fraction of images certified correct within radius ``r`` (radius >= r)."""
        return sum(1 for c, x in zip(self.correct, self.radius) if c and x >= r) / max(len(self.radius), 1)

    def figures(self, extra_radii: tuple[float, ...] = ()) -> dict[str, float]:
        out = {f"certified_acc_r{r:g}": self.certified_accuracy(r) for r in sorted({*REPORT_RADII, *extra_radii})}
        out["acr"] = self.acr()
        return out


def certify_subset(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float,
                   n0: int, n: int, alpha: float, seed: int, batch_size: int = 1000) -> Robustness:
    """CERTIFY every image of the selection subset (image i's noise from (seed, "certify", i): every
    model sees the same noise, so the comparisons are paired)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        certs = Smoothed(model, num_classes, sigma, batch_size=batch_size, seed=seed, device=device).certify_batch(
            images.float(), n0, n, alpha, indices=list(range(len(images))))
    finally:
        model.train(was_training)
    correct = tuple(c.prediction != ABSTAIN and c.prediction == int(y) for c, y in zip(certs, labels.tolist()))
    return Robustness(correct, tuple(c.radius for c in certs))


class Constraint:
    """``max_acr_loss`` (kind "acr", bound D) or ``min_certified_accuracy`` (kind "certified_accuracy",
    radius R, bound A), judged against the FP model's robustness on the same images."""

    def __init__(self, kind: str, a: float, b: float, reference: Robustness):
        self.kind, self.reference = kind, reference
        if kind == "acr":
            self.bound, self.radius = a, None
        else:
            self.radius, self.bound = a, b

    def deficit(self, rob: Robustness) -> float:
        """How far ``rob`` is from the constraint: > 0 violated, <= 0 holds."""
        if self.kind == "acr":
            return (self.reference.acr() - rob.acr()) - self.bound
        return self.bound - rob.certified_accuracy(self.radius)

    def describe(self) -> str:
        if self.kind == "acr":
            return f"ACR loss <= {self.bound:g} (FP ACR {self.reference.acr():.4f})"
        return f"certified accuracy at r = {self.radius:g} >= {self.bound:g}"


@dataclass
class Round:
    value: float             # the budget asked of the program (user's unit)
    achieved: float          # the chosen model's cost (user's unit)
    choice: dict             # layer -> precision
    robustness: Robustness
    deficit: float

    @property
    def holds(self) -> bool:
        return self.deficit <= 0


class NoFeasibleChoice(ValueError):
    """Even the largest model the candidates allow violates the certified constraint."""


def search(solve: Callable[[float], tuple[dict, float]], certify: Callable[[dict], Robustness],
           constraint: Constraint, start: float, largest: float, max_rounds: int,
           log: Callable[[str], None] = lambda _m: None) -> tuple[Optional[Round], list[Round]]:
    """The bounded re-solve loop (module docstring). ``solve(budget) -> (choice, achieved)`` runs the
    program at a budget; ``certify(choice) -> Robustness`` assembles and certifies that choice;
    ``largest`` is the budget of the costliest choice. Returns the chosen round (None when nothing
    satisfied the constraint within ``max_rounds``) and every round in order."""
    rounds: list[Round] = []
    seen: dict[tuple, Round] = {}

    def run(value: float) -> Round:
        choice, achieved = solve(value)
        key = tuple(sorted(choice.items()))
        if key in seen:
            return seen[key]
        rob = certify(choice)
        r = Round(value, achieved, choice, rob, constraint.deficit(rob))
        rounds.append(r)
        seen[key] = r
        log(f"round {len(rounds)}: budget {value:.4g} -> achieved {achieved:.4g}; ACR {rob.acr():.4f}, certified "
            f"accuracy {rob.certified_accuracy(0.25):.3f} at r = 0.25 ({'holds' if r.holds else 'violated'}: "
            f"{constraint.describe()})")
        return r

    first = run(start)
    if first.holds or max_rounds == 1:
        return (first if first.holds else None), rounds
    top = run(largest)
    if not top.holds:
        raise NoFeasibleChoice(top.deficit)
    while len(rounds) < max_rounds:
        bad = max((r for r in rounds if not r.holds), key=lambda r: r.achieved)
        good = min((r for r in rounds if r.holds), key=lambda r: r.achieved)
        lo, hi = bad.achieved, good.achieved
        value = lo + (hi - lo) * bad.deficit / (bad.deficit - good.deficit)  # the secant's zero
        for _ in range(8):  # a solution already certified: move halfway towards the satisfying budget
            choice, _ = solve(value)
            if tuple(sorted(choice.items())) not in seen:
                break
            value = (value + hi) / 2
        else:
            break  # no new model between the two: the satisfying one is the answer
        run(value)
    holding = [r for r in rounds if r.holds]
    return min(holding, key=lambda r: r.achieved), rounds

"""Which examples to keep: a fraction of the training set by score band, class-balanced when asked or
when a class would otherwise fall below a floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deploypipe.noise import noise_generator


@dataclass
class Selection:
    indices: torch.Tensor   # kept examples, sorted
    balanced: bool          # whether the kept set was made class-balanced
    reason: str             # why (asked, or a class fell below the floor)
    per_class: dict[int, int]


def _band(order: torch.Tensor, k: int, band: str) -> torch.Tensor:
    """``k`` of the positions in ``order`` (ascending by score): the top (hardest), bottom (easiest),
    or the ones around the median (middle)."""
    n = len(order)
    if band == "hardest":
        return order[n - k:]
    if band == "easiest":
        return order[:k]
    if band == "middle":
        start = max(0, (n - k) // 2)
        return order[start:start + k]
    raise ValueError(f"unknown band {band!r} — fix: use hardest, easiest or middle")


def select(scores: Optional[torch.Tensor], labels: torch.Tensor, keep: float, band: str = "hardest",
           balance: str = "auto", floor: float = 0.5, seed: int = 0) -> Selection:
    """Keep ``round(keep * N)`` examples. ``scores`` None: uniformly at random (seeded). Otherwise the
    ``band`` of the scores (higher = harder). ``balance``: on = the same fraction of every class; off =
    one ranking over all; auto = one ranking unless a class would keep less than ``floor`` x its fair
    share (keep x its size), then class-balanced — the selection says which and why."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep {keep} is not a fraction in (0, 1] — fix: give e.g. --keep 0.3")
    n = len(labels)
    if scores is not None and len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} training examples — fix: give one score per example, in "
                         "the training set's order")
    total = max(1, round(keep * n))
    g = noise_generator(seed, "prune")
    ranking = torch.randperm(n, generator=g) if scores is None else torch.argsort(scores.double(), stable=True)
    classes = labels.unique().tolist()

    def balanced() -> torch.Tensor:
        parts = []
        for c in classes:
            mine = ranking[labels[ranking] == c]  # this class, in the ranking's order
            parts.append(_band(mine, max(1, round(keep * len(mine))), band if scores is not None else "hardest"))
        return torch.cat(parts)

    if balance == "on":
        kept, reason = balanced(), "asked (balance on)"
    else:
        kept = _band(ranking, total, band if scores is not None else "hardest")
        counts = {c: int((labels[kept] == c).sum()) for c in classes}
        short = [c for c in classes if counts[c] < floor * keep * int((labels == c).sum())]
        if balance == "auto" and short:
            kept, reason = balanced(), (f"classes {short} would keep less than {floor:g} x their share of {keep:g}")
        else:
            reason = "" if balance == "off" else "every class kept at least its floor"
    kept = kept.sort().values
    per_class = {c: int((labels[kept] == c).sum()) for c in classes}
    return Selection(kept, balance == "on" or reason.startswith("classes"), reason, per_class)

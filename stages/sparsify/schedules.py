"""What the sparse layers do at optimizer step t: the recipes of Bambhaniya et al. (2024) as data.

Training has three phases over its T steps: dense [0, D), sparse [D, S), fine-tune [S, T), with
D = dense_fraction·T and S = D + sparse_fraction·T. With t' = t − D the steps since the sparse phase
began (decay starts there — one public implementation offsets it wrongly so that it starts at step 0):

- SR-STE (Zhou et al. 2021): hard target mask from D on, backward g + λ(1 − m)⊙W (λ ≈ 2e-4).
- MDGF (mask decay): W ⊙ (m + (1 − m)α(t')) with α = exp(−k t') or max(0, 1 − k t') in the sparse
  phase, straight-through backward; hard mask (α = 0) in the fine-tune phase.
- SDGF (structure decay): hard masks whose pattern gets sparser in equal steps over the sparse phase,
  e.g. 7:8 → 4:8 → 2:8 → 1:8, or at constant density of kept groups 8:64 → 4:32 → 2:16 → 1:8; the
  target pattern in the fine-tune phase.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional


from .nm_pattern import Pattern

SRSTE_LAMBDA = 2e-4


@dataclass(frozen=True)
class Decay:
    kind: str  # "exp" | "linear"
    rate: Optional[float]  # per optimizer step; None = "auto": α reaches ~0 at the end of the sparse phase

    @classmethod
    def parse(cls, text: str) -> "Decay":
        match = re.fullmatch(r"\s*(exp|linear)\s*:\s*(auto|[0-9.eE+-]+)\s*", str(text))
        try:
            rate = None if not match or match[2] == "auto" else float(match[2])
        except ValueError:
            match = None
        if not match or (rate is not None and not 0 < rate < math.inf):
            raise ValueError(f"'{text}' is not a decay — fix: "
                             "write exp:RATE or linear:RATE (per optimizer step, > 0), "
                             "e.g. exp:2e-3, linear:8e-4, or exp:auto")
        return cls(match[1], rate)

    def resolved(self, sparse_steps: int) -> "Decay":
        """"auto": exp reaches α = 1e-3, linear reaches 0, by the first fine-tune step."""
        if self.rate is not None:
            return self
        steps = max(1, sparse_steps)
        return Decay(self.kind, math.log(1e3) / steps if self.kind == "exp" else 1.0 / steps)

    def alpha(self, t: int) -> float:
        if self.rate is None:
            raise ValueError("resolve an auto decay against the sparse phase first")
        if self.kind == "exp":
            return math.exp(-self.rate * t)
        return max(0.0, 1.0 - self.rate * t)

    def __str__(self) -> str:
        return f"{self.kind}:{'auto' if self.rate is None else self.rate}"


def parse_schedule(text: str, target: Pattern) -> list[Pattern]:
    patterns = [Pattern.parse(p) for p in str(text).split(",") if p.strip()]
    if not patterns or patterns[-1] != target:
        raise ValueError(f"the SDGF schedule '{text}' must end at the target pattern {target} — fix: "
                         f"e.g. --schedule 7:8,4:8,2:8,1:8 for --pattern 1:8 (append {target})")
    if any(a.density < b.density for a, b in zip(patterns, patterns[1:])):
        raise ValueError(f"the SDGF schedule '{text}' gets denser somewhere — fix: "
                         "list patterns from dense to sparse")
    return patterns


def default_schedule(target: Pattern) -> list[Pattern]:
    """Stepwise at fixed M: (M−1):M, then halving N, down to the target (1:8 → 7:8, 4:8, 2:8, 1:8)."""
    ns, n = [], target.m - 1
    while n > target.n:
        ns.append(n)
        n = math.ceil(n / 2)
    return [Pattern(k, target.m) for k in ns] + [target]


@dataclass(frozen=True)
class SparseState:
    phase: str  # dense | sparse | finetune
    pattern: Optional[Pattern]  # None in the dense phase
    alpha: float  # multiplier of the pruned weights in the forward pass
    lam: float  # SR-STE regulariser on the pruned weights in the backward pass


@dataclass(frozen=True)
class Recipe:
    name: str  # srste | mdgf | sdgf
    target: Pattern
    total_steps: int
    dense_fraction: float = 0.0
    sparse_fraction: float = 0.7
    decay: Decay = Decay("exp", 2e-3)
    schedule: tuple[Pattern, ...] = ()
    lam: float = 0.0

    @property
    def bounds(self) -> tuple[int, int]:
        """(first sparse step, first fine-tune step)."""
        dense = round(self.dense_fraction * self.total_steps)
        return dense, min(self.total_steps, dense + round(self.sparse_fraction * self.total_steps))

    def state(self, step: int) -> SparseState:
        dense_end, sparse_end = self.bounds
        if step < dense_end:
            return SparseState("dense", None, 1.0, 0.0)
        if step >= sparse_end:
            return SparseState("finetune", self.target, 0.0, self.lam)
        t = step - dense_end
        if self.name == "mdgf":
            return SparseState("sparse", self.target, self.decay.resolved(sparse_end - dense_end).alpha(t), self.lam)
        if self.name == "sdgf":
            stages = self.schedule or (self.target,)
            k = min(len(stages) - 1, t * len(stages) // max(1, sparse_end - dense_end))
            return SparseState("sparse", stages[k], 0.0, self.lam)
        return SparseState("sparse", self.target, 0.0, self.lam)

    def group_sizes(self) -> set[int]:
        return {p.m for p in (*self.schedule, self.target)}

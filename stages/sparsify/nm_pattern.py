"""An N:M pattern (N kept of every M consecutive weights along the reduction dimension), parsed and
checked without torch so that configs and the command line can use it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"'{text}' is not an N:M pattern — fix: "
                             "write it as N:M with N < M, e.g. 2:4 or 1:8")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {n}:{m} needs 0 < N < M — fix: "
                             "e.g. 2:4, 1:4, 2:8, 1:8, 1:16, 1:32")
        if m > 128:
            raise ValueError(f"pattern {n}:{m}: M above 128 is not supported (positions are stored in a byte) — fix: "
                             "use M <= 128, e.g. 1:32 or 1:64")
        return cls(n, m)

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

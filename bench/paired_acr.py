"""ACR of two certify runs paired over the test images both certified: the mean and standard error of
the per-image difference of certified radii (0 where the run was wrong or abstained), second run
minus first. Paired over the same images, the difference has a far smaller error than the two ACRs
compared side by side, since both runs find the same images hard.

Each run is a certify stage's output folder (its certify/certify.csv; while it still runs or after
it was interrupted, the journal of the images it finished, .work/certify/<model>.jsonl), a
certify.csv or a journal file.

    python bench/paired_acr.py runs/bench-certify/certify-rs-sigma0.5 runs/bench-certify/certify-drs-sigma0.36-full
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def read_radii(path: str | Path) -> dict[int, float]:
    """Test-image index -> certified radius, 0 where the prediction is wrong or abstains."""
    path = Path(path)
    if path.is_dir():
        found = path / "certify" / "certify.csv"
        if not found.exists():
            journals = sorted((path / ".work" / "certify").glob("*.jsonl"))
            if len(journals) != 1:
                raise SystemExit(f"{path}: no certify/certify.csv and {len(journals)} journals in .work/certify; "
                                 "pass the CSV or the journal file itself")
            found = journals[0]
        path = found
    if path.suffix == ".jsonl":
        radii = {}
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            if "index" in row:
                radii[int(row["index"])] = float(row["radius"]) * int(row["correct"])
        return radii
    with open(path, newline="") as fh:
        return {int(r["index"]): float(r["radius"]) * int(r["correct"]) for r in csv.DictReader(fh)}


def paired_difference(first: dict[int, float], second: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard error of second - first over the images both hold, and how many those are."""
    d = [second[i] - first[i] for i in sorted(first.keys() & second.keys())]
    if not d:
        raise ValueError("the two runs have no test image in common")
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1))
    return mean, sd / math.sqrt(len(d)), len(d)


def verdict(diff: float, se: float) -> str:
    """Where the second run stands against the first, from the paired difference and its standard error."""
    if diff == 0:
        return "level: a tie"
    side = "above" if diff > 0 else "below"
    if abs(diff) < se:
        return f"{side}, but within one standard error: a tie"
    return f"{side} by {abs(diff) / se:.1f} standard errors" if se > 0 else side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", help="certify output folder, certify.csv or journal (.jsonl)")
    ap.add_argument("second", help="the same, for the run compared against the first")
    args = ap.parse_args()
    a, b = read_radii(args.first), read_radii(args.second)
    diff, se, n = paired_difference(a, b)
    common = a.keys() & b.keys()
    acr_a, acr_b = (sum(r[i] for i in common) / n for r in (a, b))
    print(f"{n} images in common ({len(a)} in the first run, {len(b)} in the second)")
    print(f"ACR over them: first {acr_a:.3f}, second {acr_b:.3f}")
    print(f"second - first, paired: {diff:+.3f} +- {se:.3f} standard error: {verdict(diff, se)}")


if __name__ == "__main__":
    sys.exit(main())

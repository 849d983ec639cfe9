"""ACR of two certify runs paired over the test images both certified: the mean and standard error of
the per-image difference of certified radii (0 where the run was wrong or abstained), second run
minus first. Paired over the same images, the difference has a far smaller error than the two ACRs
compared side by side, since both runs find the same images hard.

Each run is a certify stage's output folder (its certify/certify.csv; while it still runs or after
it was interrupted, the journal of the images it finished, .work/certify/<model>.jsonl), a
certify.csv or a journal file.

    python bench/paired_acr.py runs/bench-certify/certify-rs-sigma0.5 runs/bench-certify/certify-drs-sigma0.36-full

When the first run is RS and the second DRS (read from the config.yaml beside each finished run's
table), the difference is also accounted for, exactly, in four parts. On an image both certify
correctly, RS's radius is sigma_rs * c and DRS's sigma_drs * sqrt(2) * m, with c = Phi^-1 of RS's
bound and m the mean of the two sides' Phi^-1 (the sound radius), so DRS's radius is
k = sigma_drs * sqrt(2) / sigma_rs times what RS would give at the same confidence (k = 1 at exactly
matched noise; 1.018 for the pairs 0.18 / 0.25 and 0.36 / 0.5). The parts: the noise scale (DRS's
radii there times 1 - 1/k), the sides' confidence (DRS's radii there divided by k, minus RS's), the
images only DRS certifies, and minus those only RS certifies.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)


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


def run_config(path: str | Path) -> Optional[dict]:
    """The certify config (method, sigma, ...) of a finished run: the config.yaml beside its table."""
    path = Path(path)
    found = path / "certify" / "config.yaml" if path.is_dir() else path.parent / "config.yaml"
    if path.suffix == ".jsonl" or not found.exists():
        return None
    return (yaml.safe_load(found.read_text()) or {}).get("certify")


def drs_against_rs(rs: dict[int, float], drs: dict[int, float], sigma_rs: float, sigma_drs: float) -> dict:
    """ACR(DRS) - ACR(RS) over the images both runs hold, split into four parts that sum to it
    exactly (see the module docstring), with the mean confidences Phi^-1 on the images both certify."""
    common = sorted(rs.keys() & drs.keys())
    if not common:
        raise ValueError("the two runs have no test image in common")
    k = sigma_drs * math.sqrt(2) / sigma_rs
    both = [i for i in common if rs[i] > 0 and drs[i] > 0]
    drs_only = [i for i in common if drs[i] > 0 and rs[i] == 0]
    rs_only = [i for i in common if rs[i] > 0 and drs[i] == 0]
    n, n_both = len(common), max(len(both), 1)
    return {
        "k": k,
        "both": len(both),
        "rs_confidence": sum(rs[i] for i in both) / sigma_rs / n_both,
        "drs_confidence": sum(drs[i] for i in both) / (sigma_drs * math.sqrt(2)) / n_both,
        "noise_scale": sum(drs[i] for i in both) * (1 - 1 / k) / n,
        "confidence": sum(drs[i] / k - rs[i] for i in both) / n,
        "drs_only": sum(drs[i] for i in drs_only) / n,
        "drs_only_images": len(drs_only),
        "rs_only": -sum(rs[i] for i in rs_only) / n,
        "rs_only_images": len(rs_only),
    }


def accounting_lines(p: dict) -> list[str]:
    """``drs_against_rs``'s parts as the lines paired_acr.py and bench/certify.py print."""
    return [f"on the {p['both']} images both certify correctly, mean Phi^-1 of the bound: RS {p['rs_confidence']:.3f}, "
            f"DRS sides {p['drs_confidence']:.3f}; DRS - RS, accounted for:",
            *(f"  {label:<36} {p[key]:+.4f}" for label, key in (
                (f"noise scale ({p['k']:.3f}x)", "noise_scale"), ("side confidence", "confidence"),
                (f"images only DRS certifies ({p['drs_only_images']})", "drs_only"),
                (f"images only RS certifies ({p['rs_only_images']})", "rs_only")))]


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
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, 'Paired ACR difference of two certifications').start()
    a, b = read_radii(args.first), read_radii(args.second)
    diff, se, n = paired_difference(a, b)
    common = a.keys() & b.keys()
    acr_a, acr_b = (sum(r[i] for i in common) / n for r in (a, b))
    print(f"{n} images in common ({len(a)} in the first run, {len(b)} in the second)")
    print(f"ACR over them: first {acr_a:.3f}, second {acr_b:.3f}")
    print(f"second - first, paired: {diff:+.3f} +- {se:.3f} standard error: {verdict(diff, se)}")
    first, second = run_config(args.first), run_config(args.second)
    if first and second and (first.get("method"), second.get("method")) == ("rs", "drs"):
        p = drs_against_rs(a, b, float(first["sigma"]), float(second["sigma"]))
        print(f"RS at sigma {first['sigma']}, DRS at {second['sigma']}: per unit of confidence DRS's radius is "
              f"{p['k']:.3f}x RS's (sigma_drs * sqrt(2) / sigma_rs)")
        print("\n".join(accounting_lines(p)))
    report.finish()


if __name__ == "__main__":
    sys.exit(main())

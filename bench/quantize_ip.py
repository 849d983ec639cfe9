"""How long does the bit-allocation integer program take at ResNet-56 scale? (target: < 1 s)

Uses ResNet-56's real layer sizes (54 layers between the first and the last, which stay at 8 bits)
and weight candidates {2, 3, 4, 8}; the loss deltas are synthetic (seeded: a per-layer sensitivity
times 4^-bits, plus noise), because measuring real ones needs a trained model — the solver's work
does not depend on where the numbers came from. Solves the primal at several size budgets
(fraction of the FP32 model) and the dual at a few loss bounds, with PuLP + CBC, and prints a table.

    python bench/quantize_ip.py [--repeats 3] [--report docs/benchmarks/quantize_ip.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Bit allocation: integer-program solve time at ResNet-56 scale").start()

    from deploypipe.stages.quantize.bit_allocation import allocate_bits
    from deploypipe.stages.quantize.modules import quantizable_layers
    from deploypipe.zoo import resnet56

    model = resnet56()
    layers = quantizable_layers(model)
    middle = layers[1:-1]
    fp_bits = 32 * sum(p.numel() for p in model.parameters())
    fixed = 32 * sum(p.numel() for p in model.parameters()) - 32 * sum(m.weight.numel() for _, m in middle)
    candidates = [2, 3, 4, 8]
    rng = np.random.default_rng(0)
    dloss = {n: {} for n, _ in middle}
    for n, _ in middle:
        sens = rng.lognormal(0, 1)
        for b in candidates:
            dloss[n][b] = float(sens * 4.0 ** (-b) + abs(rng.normal(0, 1e-4)))
    cost = {n: {b: float(b * m.weight.numel()) for b in candidates} for n, m in middle}

    columns = ["objective", "constraint", "status", "CBC s (median)", "whole call s (median)", "avg weight bits",
               "sum dloss"]
    rows = []
    def timed(**constraint):
        cbc, whole, alloc = [], [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            alloc = allocate_bits(dloss, cost, **constraint)
            whole.append(time.perf_counter() - t0)
            cbc.append(alloc.solve_seconds)
        avg = alloc.cost / sum(m.weight.numel() for _, m in middle)
        return [alloc.status, f"{statistics.median(cbc):.3f}", f"{statistics.median(whole):.3f}", f"{avg:.2f}",
                f"{alloc.delta_loss:.4g}"]

    for budget in (0.10, 0.13, 0.2):
        rows.append(["min dloss", f"size <= {budget:.2f} of FP32", *timed(budget=budget * fp_bits - fixed)])
    total_at_4 = sum(d[4] for d in dloss.values())
    for bound in (0.5 * total_at_4, total_at_4, 2 * total_at_4):
        rows.append(["min size", f"sum dloss <= {bound:.3g}", *timed(max_loss=bound)])
    print(markdown_table(columns, rows, f"ResNet-56: {len(middle)} layers x {len(candidates)} weight candidates "
                                        f"{candidates}, PuLP + CBC, median of {args.repeats}"))
    print("CBC s: PuLP's solve (writes the model, runs CBC in a subprocess, reads the solution); "
          "whole call: also building the PuLP model and the feasibility check. Synthetic, seeded loss deltas "
          "(the solver's work does not depend on where they come from); FP32 size counts the first and last "
          "layer at 32 bits.")
    worst = max(float(r[4]) for r in rows)
    report.finish(headline=f"per-layer bit allocation (54 layers x 4 precisions) solved by PuLP + CBC in at most "
                           f"{worst:.3f} s per call (target < 1 s)")


if __name__ == "__main__":
    main()

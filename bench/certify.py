"""Certified accuracy on CIFAR-10: randomized smoothing (RS) against dual randomized smoothing (DRS)
at matched noise, ResNet-20 base classifiers trained with Gaussian noise.

From one dense CIFAR ResNet-20 (a train stage's model folder) the script fine-tunes, with the same
epochs, learning rate, data order and seed, an RS base classifier per sigma (default 0.25 and 0.5)
and a left and a right DRS base classifier per DRS sigma (default 0.18 and 0.36 = RS sigma / sqrt(2),
the matched levels of Xia et al.; ``--drs-models shared``: one model trained on both halves, the
compute of one RS model; ``separate,shared``: both kinds of row; ``--drs-input full``: each DRS side
network sees its pixels back in the full grid (the others filled from their neighbours), at twice
the compute; ``--dense zoo:resnet20``: every base classifier trained from scratch), then certifies
each on the same test images (every 20th: 500) with n0 = 100, n = 10,000, alpha = 0.001. Every
step is one ``python -m deploypipe train|certify ... --json`` subprocess, exactly as a user runs it
(wall time and peak RSS read with wait4); steps finished with the same settings are read back when the script is rerun (deploypipe skips them by their stage key; a rerun with, say, --every 50 after --every 100 certifies again).
The table (certified accuracy at radii 0 .. 1.5, ACR, top-1 of the base classifiers on the clean
test images and, where the train stage reported it, under one draw of their noise; seconds per
image) goes to stdout and to ``--out``/results.md and results.json, the curves of all rows to ``--out``/certified_accuracy.png.

    python bench/certify.py --dense runs/resnet20/train/model --data imagefolder:../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from paired_acr import accounting_lines, drs_against_rs, paired_difference, read_radii, verdict  # noqa: E402 (after the path insert)
from runner import run_deploypipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", required=True,
                    help="dense CIFAR ResNet-20 model folder to fine-tune with noise, or zoo:resnet20 to train from scratch")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--rs-sigmas", default="0.25,0.5")
    ap.add_argument("--drs-sigmas", default="0.18,0.36")
    ap.add_argument("--epochs", type=int, default=4, help="noise fine-tuning epochs per base classifier")
    ap.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine), SGD")
    ap.add_argument("--consistency", type=float, default=0.0, help="consistency regulariser weight (0 = Gaussian augmentation only)")
    ap.add_argument("--drs-models", default="separate",
                    help="DRS base classifiers: separate (one per side), shared (one trained on both halves: "
                         "train --drs-side both), or separate,shared (a row for each)")
    ap.add_argument("--drs-input", choices=("half", "full"), default="half",
                    help="what a DRS side model's network sees: the packed half-image (half) or the side's pixels "
                         "back in the full grid, the others filled from their neighbours (full: train --drs-input "
                         "full; twice the compute; side models only, --drs-models separate)")
    ap.add_argument("--every", type=int, default=20, help="certify every k-th test image")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--autocast", action="store_true", help="certify with the base classifier under autocast (bfloat16 on CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-certify")
    ap.add_argument("--only-train", action="store_true", help="train the base classifiers, certify nothing (yet)")
    ap.add_argument("--grow", action="store_true",
                    help="certify --reuse each row's earlier output in --out (e.g. --every 20 after --every 100): the "
                         "certificates of the images both select are read back, only the new images are certified")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, 'Certify: randomized and dual randomized smoothing on CIFAR-10').start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def train(label: str, sigma: float, side: str | None = None) -> tuple[str, tuple[float, float | None]]:
        cmd = ["--model", args.dense, "--data", args.data, "--noise-sigma", str(sigma), "--epochs", str(args.epochs),
               "--lr", str(args.lr), "--schedule", "cosine"]
        if args.consistency > 0:
            cmd += ["--consistency", str(args.consistency)]
        if side:
            cmd += ["--drs-side", side] + (["--drs-input", "full"] if args.drs_input == "full" else [])
        m = run_deploypipe("train", label, cmd, out, args.threads)
        return str(out / label / "train" / "model"), (m["test_top1"], m.get("test_top1_noisy"))

    certify_opts = ["--data", args.data, "--every", str(args.every), "--n", str(args.n), "--n0", str(args.n0),
                    "--alpha", str(args.alpha), "--batch-size", str(args.batch_size)]
    if args.autocast:
        certify_opts.append("--autocast")
    rs = [("rs", float(s)) for s in args.rs_sigmas.split(",") if s]
    kinds = [k for k in args.drs_models.split(",") if k]
    if not kinds or set(kinds) - {"separate", "shared"}:
        ap.error("--drs-models takes separate, shared or separate,shared")
    if args.drs_input == "full" and "shared" in kinds:
        ap.error("--drs-input full fills one side's grid: use it with --drs-models separate")
    drs = [("drs", float(s)) for s in args.drs_sigmas.split(",") if s]
    order = [x for pair in zip(rs, drs) for x in pair] + rs[len(drs):] + drs[len(rs):]  # matched pairs first
    rows = []
    steps = [(m, s, k) for m, s in order for k in (kinds if m == "drs" else [None])]
    for method, sigma, kind in steps:
        tag = f"{method}-sigma{sigma:g}" + ("-full" if method == "drs" and args.drs_input == "full" else "")
        print(f"{method.upper()}{' (shared)' if kind == 'shared' else ''} sigma {sigma:g}", flush=True)
        if method == "rs":
            model, clean = train(f"train-{tag}", sigma)
            cmd = ["--model", model, "--method", "rs"]
        elif kind == "shared":  # one model for both halves: the compute of one RS model
            tag += "-shared"
            model, clean = train(f"train-{tag}", sigma, "both")
            cmd = ["--model", model, "--method", "drs"]
        else:
            left, clean_l = train(f"train-{tag}-left", sigma, "left")
            right, clean_r = train(f"train-{tag}-right", sigma, "right")
            clean = tuple(None if None in (a, b) else (a + b) / 2 for a, b in zip(clean_l, clean_r))
            cmd = ["--model", left, "--model-right", right, "--method", "drs"]
        if args.only_train:
            continue
        earlier = out / f"certify-{tag}" / "certify"  # read at the start; replaced only when the new run finishes
        grow = ["--reuse", str(earlier)] if args.grow and (earlier / "provenance.json").is_file() else []
        m = run_deploypipe("certify", f"certify-{tag}", [*cmd, "--sigma", str(sigma), *certify_opts, *grow], out,
                           args.threads)
        label = ", ".join(([kind] if kind == "shared" else []) + (["full grid"] if tag.endswith("-full") else []))
        rows.append({"method": method.upper() + (f" ({label})" if label else ""),
                     "sigma": sigma, "clean_top1": clean[0], "noisy_top1": clean[1], "acr": m["acr"],
                     "seconds_per_image": m["seconds_per_image"], "images": int(m["images"]),
                     "abstain_rate": m["abstain_rate"], "wall_seconds": m["wall_seconds"],
                     **{f"r{r:g}": m[f"certified_acc_r{r:g}"] for r in RADII},
                     "csv": str(out / f"certify-{tag}" / "certify" / "certify.csv")})

    if args.only_train:
        return
    start = "from scratch" if args.dense.startswith("zoo:") else f"fine-tuned from `{args.dense}`"
    lines = [f"ResNet-20 base classifiers trained {args.epochs} epochs with Gaussian noise {start} (lr {args.lr:g}, cosine)"
             f"{f' (consistency {args.consistency:g})' if args.consistency else ''}; every {args.every}th test image "
             f"({rows[0]['images'] if rows else 0}), n0 {args.n0}, n {args.n:,}, alpha {args.alpha}, batch "
             f"{args.batch_size}{', autocast' if args.autocast else ''}, {args.threads} CPU threads.", "",
             "| method | sigma | top-1 of base: clean / noisy | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR | s / image |",
             "|---|---|---|" + "---|" * len(RADII) + "---|---|"]
    for r in rows:
        noisy = "–" if r["noisy_top1"] is None else f"{100 * r['noisy_top1']:.2f}"
        lines.append(f"| {r['method']} | {r['sigma']:g} | {100 * r['clean_top1']:.2f} / {noisy} | "
                     + " | ".join(f"{100 * r[f'r{x:g}']:.1f}" for x in RADII)
                     + f" | {r['acr']:.3f} | {r['seconds_per_image']:.2f} |")
    pairs = [(a, b) for a in rows for b in rows if a["method"] == "RS" and b["method"].startswith("DRS")
             and math.isclose(b["sigma"], a["sigma"] / math.sqrt(2), rel_tol=0.05)]
    if pairs:
        lines.append("")
        for a, b in pairs:
            rs_radii, drs_radii = read_radii(a["csv"]), read_radii(b["csv"])
            diff, se, _ = paired_difference(rs_radii, drs_radii)
            p = drs_against_rs(rs_radii, drs_radii, a["sigma"], b["sigma"])
            lines.append(f"{b['method']} sigma {b['sigma']:g} ACR {b['acr']:.3f} vs RS sigma {a['sigma']:g} ACR "
                         f"{a['acr']:.3f}: {verdict(diff, se)} (paired over the same images: {diff:+.3f} +- {se:.3f} standard error; "
                         f"with the DRS reference code's radius sigma*sqrt(a^2+b^2) the same votes give ACR >= "
                         f"{reference_formula_acr(b['csv'], b['sigma']):.3f}); per unit of confidence a DRS radius is "
                         f"{p['k']:.3f}x an RS one (sigma_drs * sqrt(2) / sigma_rs)")
            lines += accounting_lines(p)
    text = "\n".join(lines)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    plot(rows, out / "certified_accuracy.png")
    report.finish(text)


def reference_formula_acr(drs_csv: str, sigma: float) -> float:
    """The ACR the DRS reference code's radius sigma * sqrt(max(a, 0)^2 + max(b, 0)^2) would give on
    the same votes (a, b = Phi^-1 of each side's lower bound in the CSV), over the images the sound
    rule certifies correctly; the images it abstains on are counted as 0, so a lower bound of what
    that code reports (it would also certify a correct image with a + b <= 0 < max(a, b), at a radius
    below sigma * Phi^-1 of that one side)."""
    from statistics import NormalDist

    ppf = NormalDist().inv_cdf
    with open(drs_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    total = 0.0
    for r in rows:
        if int(r["correct"]):
            a, b = (max(ppf(min(float(r[k]), 1 - 1e-16)), 0.0) for k in ("p_lower", "p_lower_right"))
            total += sigma * math.hypot(a, b)
    return total / len(rows)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        with open(r["csv"], newline="") as fh:
            cert = list(csv.DictReader(fh))
        radii = sorted(float(c["radius"]) for c in cert if int(c["correct"]))
        grid = [i * 0.01 for i in range(0, 201)]
        ax.plot(grid, [100 * sum(1 for x in radii if x >= g) / len(cert) for g in grid],
                label=f"{r['method']} sigma={r['sigma']:g} (ACR {r['acr']:.3f})")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)", title="CIFAR-10, ResNet-20 base classifiers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()

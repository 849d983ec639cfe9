"""Post-training quantization of a CIFAR-10 ResNet-20: deploypipe's quantize stage against its peers.

For W8A8, W4A8, W4A4 and W3A4 (first and last layer at 8 bits): top-1 with round-to-nearest from
min-max, percentile (99.99) and MSE-optimal ranges, then + AdaQuant (sequential), + BN
re-estimation, + bias tuning — with the calibration wall time and the peak resident memory of each
run. Then integer-programming mixed precision (weights {2, 3, 4, 8}, inputs 8-bit) at 0.10 and 0.13
of the FP32 size. In the same script, on the same model and the same 1,024 calibration images
(the calibration split of the train folder, never the test split): ONNX Runtime's static INT8
quantization (QDQ, per-channel, symmetric; min-max and percentile calibration) and NNCF's
``nncf.quantize`` when nncf is importable.

Every deploypipe row is one ``python -m deploypipe quantize ... --json`` subprocess (its peak RSS is
read with wait4), exactly what a user runs; the results land in ``--out`` (tables as results.md and
results.json).

    python bench/quantize.py --model runs/resnet20/train/model --data imagefolder:../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)
from runner import run_deploypipe  # noqa: E402

SETTINGS = [("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A4", 4, 4), ("W3A4", 3, 4)]
# AdaQuant schedules: today's default, and the paper's (1,000 steps at its reference rates, no early stop)
SCHEDULES = {"new": [], "paper": ["--iters", "1000", "--patience", "0", "--lr-weight", "1e-5", "--lr-bias", "1e-3",
                                  "--lr-weight-scale", "1e-3", "--lr-act-scale", "1e-2"]}
SCHEDULE_LABEL = {"new": "250 steps, 4x rates, early stop", "paper": "1,000 steps, paper rates"}


def run_stage(label: str, args: list[str], out: Path, threads: int) -> dict:
    return run_deploypipe("quantize", label, args, out, threads)


def num(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved model/ folder (e.g. the train stage's output)")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--out", default="bench/out/quantize")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peers-only", action="store_true", help="run only the peers (and print their table)")
    ap.add_argument("--settings", default=",".join(name for name, _, _ in SETTINGS),
                    help="which rows to run, e.g. W8A8,W4A8 (default: all four)")
    ap.add_argument("--skip-mixed", action="store_true", help="leave out the mixed-precision run")
    ap.add_argument("--schedules", default="new",
                    help="AdaQuant schedules to run, comma-separated: new (the default) and/or paper (1,000 steps)")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Quantize: CIFAR-10 ResNet-20, deploypipe against ONNX Runtime and NNCF").start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    common = ["--model", args.model, "--data", args.data, "--calib-size", str(args.calib_size)]
    results: dict = {"model": args.model, "data": args.data, "threads": args.threads, "rows": {}, "peers": {}}

    if args.peers_only:
        results["peers"] = run_peers(args, out)
        (out / "peers.json").write_text(json.dumps(results["peers"], indent=2))
        print(render({**results, "rows": {}}))
        return
    print("deploypipe quantize runs:", flush=True)
    for name, w, a in [s for s in SETTINGS if s[0] in args.settings.split(",")]:
        bits = ["--weight-bits", str(w), "--act-bits", str(a)]
        row = {}
        for rng in ("minmax", "percentile"):
            m = run_stage(f"{name}-rtn-{rng}", common + bits + ["--method", "rtn", "--weight-range", rng,
                                                               "--act-range", rng, "--no-export-onnx"], out, args.threads)
            row[f"rtn_{rng}"] = m["rtn_top1"]
            row["fp"] = m["fp_top1"]
        for schedule in args.schedules.split(","):
            label = f"{name}-adaquant" + ("" if schedule == "new" else f"-{schedule}")
            m = run_stage(label, common + bits + SCHEDULES[schedule] + ["--bn-tuning", "--bias-tuning"], out,
                          args.threads)
            results["rows"][name if schedule == "new" else f"{name} ({SCHEDULE_LABEL[schedule]})"] = dict(
                row, schedule=SCHEDULE_LABEL[schedule], rtn_mse=m["rtn_top1"], adaquant=m["adaquant_top1"],
                bn=m["bn_top1"], bias=m["bias_top1"], calibration_seconds=m["calibration_seconds"],
                adaquant_seconds=m.get("adaquant_seconds"), bias_seconds=m.get("bias_seconds"),
                bn_seconds=m.get("bn_seconds"), wall_seconds=m["wall_seconds"], peak_rss_mb=m["peak_rss_mb"],
                cache_peak_mb=m["cache_peak_mb"], size_fraction=m["size_fraction_of_fp32"],
                onnx_agreement=m["onnx_top1_agreement"])
    if not args.skip_mixed:
        m = run_stage("mixed", common + ["--act-bits", "8", "--bit-candidates", "2,3,4,8", "--budget", "0.10",
                                         "--sweep", "0.10,0.13", "--no-export-onnx"], out, args.threads)
        import csv

        front = list(csv.DictReader(open(out / "mixed" / "quantize" / "pareto.csv")))
        results["mixed"] = {"points": front, "ip_solve_seconds": m["ip_solve_seconds"],
                            "calibration_seconds": m["calibration_seconds"], "peak_rss_mb": m["peak_rss_mb"],
                            "wall_seconds": m["wall_seconds"]}

    if not args.skip_peers:
        results["peers"] = run_peers(args, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = render(results)
    (out / "results.md").write_text(md)
    print(md)
    report.finish(md, headline(results))


def headline(r: dict) -> str:
    """The README's one line: each row's output model (AdaQuant + BN + bias tuning, the steps kept by
    their calibration-set guards; no step is picked on the test split) against FP32."""
    parts = []
    for name, row in r["rows"].items():
        if "(" in name:  # another schedule, side by side in the table
            continue
        final = row["bias"]
        parts.append(f"{name} {pct(final)}% ({100 * (final - row['fp']):+.2f} pt, {row['size_fraction']:.3f} of the size)")
    fp = next(iter(r["rows"].values()))["fp"] if r["rows"] else None
    return (f"top-1 with FP32 at {pct(fp)}%: " if fp is not None else "") + "; ".join(parts)


def run_peers(args, out: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from quantize_peers import nncf_int8, nncf_status, onnx_top1, ort_static_int8

    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.evaluation import top1_and_loss
    from deploypipe.models import load_model

    splits = load_data(DataSpec(source=args.data, calib_size=args.calib_size))
    model = load_model(args.model).eval()
    calib = splits.calib.as_float(splits.calib.images).numpy()
    x = splits.test.as_float(splits.test.images).numpy()
    y = splits.test.labels.numpy()
    peers = {}
    print("peers:", flush=True)
    for method in ("minmax", "percentile"):
        t0 = time.perf_counter()
        path = ort_static_int8(model, splits.input_shape, calib, out / "peers", method=method, threads=args.threads)
        secs = time.perf_counter() - t0
        peers[f"ONNX Runtime static INT8 ({method})"] = {"top1": onnx_top1(path, x, y, threads=args.threads),
                                                         "calibration_seconds": secs}
        print(f"  ORT {method}: {peers[f'ONNX Runtime static INT8 ({method})']}", flush=True)
    status = nncf_status()
    t0 = time.perf_counter()
    qnet = nncf_int8(model, calib)
    if qnet is not None:
        secs = time.perf_counter() - t0
        peers[f"NNCF nncf.quantize ({status})"] = {"top1": top1_and_loss(qnet, splits.test)[0], "calibration_seconds": secs}
    else:
        peers["NNCF"] = {"top1": None, "note": status}
    print(f"  NNCF: {status}", flush=True)
    return peers


def render(r: dict) -> str:
    lines = [f"model `{r['model']}`, data `{r['data']}`, {r['threads']} CPU threads; test top-1 (%) on the 10,000 test images",
             "AdaQuant schedule: 250 steps per layer at 4x the paper's learning rates, stopped after 3 probe checks "
             "without a better calibration MSE (the default); rows marked \"paper\" run the paper's 1,000 steps at its "
             "rates in the same run. Seconds: the AdaQuant step (captures + optimisation), BN re-estimation, bias "
             "tuning, and the whole calibration (evaluations excluded).",
             "", "| setting | FP32 | RTN min-max | RTN percentile | RTN MSE | + AdaQuant | + BN | + bias | Δ vs FP32 | "
             "AdaQuant s | BN s | bias s | calibration s | peak RSS MB | size / FP32 | ONNX agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        final = row["bias"]
        lines.append(f"| {name} | {pct(row['fp'])} | {pct(row['rtn_minmax'])} | {pct(row['rtn_percentile'])} | "
                     f"{pct(row['rtn_mse'])} | {pct(row['adaquant'])} | {pct(row['bn'])} | {pct(final)} | "
                     f"{100 * (final - row['fp']):+.2f} | {num(row.get('adaquant_seconds'))} | "
                     f"{num(row.get('bn_seconds'))} | {num(row.get('bias_seconds'))} | {row['calibration_seconds']:.0f} | "
                     f"{num(row['peak_rss_mb'])} | {row['size_fraction']:.3f} | {pct(row['onnx_agreement'])} |")
    mixed = r.get("mixed")
    if mixed:
        lines += ["", "Mixed precision (weights {2, 3, 4, 8} per layer by PuLP + CBC, inputs 8-bit, AdaQuant deltas; "
                  f"solve {mixed['ip_solve_seconds']:.3f} s; run {num(mixed['wall_seconds'])} s):", "",
                  "| budget (size / FP32) | achieved | average bits | top-1 | bits per layer |", "|---|---|---|---|---|"]
        for p in mixed["points"]:
            lines.append(f"| {float(p['budget']):.2f} | {float(p['size_fraction_of_fp32']):.4f} | "
                         f"{float(p['average_bits']):.2f} | {pct(float(p['test_top1']))} | {p['bits']} |")
    if r.get("peers"):
        lines += ["", "Peers (8-bit, same model and calibration images):", "", "| peer | top-1 | calibration s |", "|---|---|---|"]
        for name, p in r["peers"].items():
            secs = p.get("calibration_seconds")
            lines.append(f"| {name} | {pct(p['top1']) if p['top1'] is not None else p.get('note')} | "
                         f"{'–' if secs is None else f'{secs:.1f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""N:M sparse fine-tuning on CIFAR-10: SR-STE against progressive gradient flow (MDGF, SDGF).

For each dense model given (a CIFAR ResNet-20 from the train stage; a small ViT with patch 4 when
``--vit`` is given) and each pattern (default 2:4, 1:4, 1:8, 1:16), the three recipes fine-tune from
the same dense checkpoint with the same epochs, learning rate, data order and seed. Every cell is one
``python -m deploypipe sparsify ... --json`` subprocess (wall time and peak RSS read with wait4),
exactly what a user runs; finished cells are read back when the script is rerun. With
``--dense-control`` each dense model is also fine-tuned the same way without sparsity (the train
stage; ``--extra`` then goes to it too), so a gain from extra training is not read as a sparsity
result. Tables go to stdout and to ``--out``/results.md and results.json.

    python bench/sparsify.py --model runs/resnet20/train/model --data imagefolder:../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)
from runner import run_deploypipe  # noqa: E402

RECIPES = ["srste", "mdgf", "sdgf"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="dense CIFAR ResNet-20 (a train stage's model folder)")
    ap.add_argument("--vit", help="dense small ViT (patch 4) model folder, optional")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--patterns", default="2:4,1:4,1:8,1:16")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.02, help="peak learning rate (cosine), SGD")
    ap.add_argument("--vit-lr", type=float, default=5e-4, help="peak learning rate for the ViT (AdamW)")
    ap.add_argument("--decay", default="exp:auto", help="MDGF decay (exp:auto reaches 1e-3 at the end of the sparse phase)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-sparsify")
    ap.add_argument("--extra", default="", help="more sparsify options for every run, e.g. '--limit-train 10000'")
    ap.add_argument("--dense-control", action="store_true",
                    help="also fine-tune each dense model the same way without sparsity (train stage, same optimizer, "
                         "learning rate, epochs and data): what the extra training alone gives")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, 'Sparsify: CIFAR-10 N:M fine-tuning, SR-STE against progressive gradient flow (MDGF, SDGF)').start()
    if not (args.model or args.vit):
        ap.error("give --model (ResNet-20), --vit (small ViT) or both")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [("ResNet-20", args.model, ["--lr", str(args.lr)])] if args.model else []
    if args.vit:
        models.append(("ViT (patch 4)", args.vit, ["--optimizer", "adamw", "--lr", str(args.vit_lr), "--weight-decay", "0.05"]))
    results = {"data": args.data, "epochs": args.epochs, "decay": args.decay, "threads": args.threads,
               "extra": args.extra, "rows": []}
    for name, path, opts in models:
        control = None
        if args.dense_control:  # the same fine-tune, dense: separates the cost of sparsity from more training
            print(f"{name} dense control", flush=True)
            label = f"{name.split()[0].lower()}-dense-control"
            cmd = ["--model", path, "--data", args.data, "--epochs", str(args.epochs), "--schedule", "cosine",
                   *opts, *args.extra.split()]
            control = run_deploypipe("train", label, cmd, out, args.threads)["test_top1"]
        for pattern in args.patterns.split(","):
            row = {"model": name, "pattern": pattern, "dense_control": control}
            for recipe in args.recipes.split(","):
                label = f"{name.split()[0].lower()}-{pattern.replace(':', 'of')}-{recipe}"
                print(f"{name} {pattern} {recipe}", flush=True)
                cmd = ["--model", path, "--data", args.data, "--pattern", pattern, "--recipe", recipe,
                       "--epochs", str(args.epochs), "--decay", args.decay, *opts, *args.extra.split()]
                m = run_deploypipe("sparsify", label, cmd, out, args.threads)
                row.update(dense=m["dense_top1"], oneshot=m["oneshot_top1"])
                row[recipe] = m["test_top1"]
                row[f"{recipe}_seconds"] = m["wall_seconds"]
                row[f"{recipe}_rss_mb"] = m["peak_rss_mb"]
            results["rows"].append(row)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    report.finish(text)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def render(r: dict) -> str:
    lines = [f"data `{r['data']}`{' ' + r['extra'] if r.get('extra') else ''}, {r['epochs']} epochs per run, "
             f"MDGF decay {r['decay']}, {r['threads']} CPU threads; test top-1 (%) on the 10,000 test images", "",
             "| model | pattern | dense | dense, same fine-tune | pruned, no training | SR-STE | MDGF | SDGF | "
             "best PGF − SR-STE | s per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        pgf = [row[k] for k in ("mdgf", "sdgf") if k in row]
        gain = f"{100 * (max(pgf) - row['srste']):+.2f}" if pgf and "srste" in row else "—"
        secs = [row[k] for k in row if k.endswith("_seconds") and row[k] is not None]
        lines.append(f"| {row['model']} | {row['pattern']} | {pct(row['dense'])} | {pct(row.get('dense_control'))} | "
                     f"{pct(row['oneshot'])} | "
                     f"{pct(row.get('srste'))} | {pct(row.get('mdgf'))} | {pct(row.get('sdgf'))} | {gain} | "
                     f"{sum(secs) / max(1, len(secs)):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

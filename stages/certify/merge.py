"""``deploypipe certify-merge``: combine the outputs of sharded certify runs (``--shard i/k``, one per
job-array task or torchrun rank) into the metrics and plot of the unsharded run.

Under torchrun (``torchrun --nproc-per-node K -m deploypipe certify ... --out runs/c``) rank r writes
``runs/c/rank<r>/certify`` with shard r/K (recorded in its result.json); merge those folders.

Each shard folder is a certify stage output (``certify.csv`` + ``config.yaml``). The shards must
share every setting but ``shard``, be the k different shards of one split, and together hold each
image once; the noise of an image depends only on (seed, image index), so the merged CSV equals the
unsharded one (up to the timing column).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import yaml

from deploypipe.errors import InputError

from .stage import CertifyConfig, plot_curves, summarize


def _read_shard(folder: Path) -> tuple[dict, list[dict]]:
    table, config = folder / "certify.csv", folder / "config.yaml"
    if not table.is_file() or not config.is_file():
        raise InputError(f"'{folder}' is not a certify output folder (needs certify.csv and config.yaml)",
                         "give the <out>/certify folders the sharded runs wrote")
    cfg = yaml.safe_load(config.read_text())
    cfg = cfg.get("certify", cfg) if isinstance(cfg, dict) else {}
    try:  # a torchrun rank's shard is in its result, not in its config
        metrics = json.loads((folder / "result.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        metrics = {}
    if not cfg.get("shard") and "shard_count" in metrics:
        cfg["shard"] = f"{int(metrics['shard_index'])}/{int(metrics['shard_count'])}"
    with open(table, newline="") as fh:
        rows = [{k: (float(v) if k in ("radius", "seconds", "p_lower", "p_lower_right") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(fh)]
    return cfg, rows


def merge_shards(folders: list[Path]) -> tuple[CertifyConfig, list[dict]]:
    """Check the shards belong together and return their settings and rows, sorted by image index."""
    if not folders:
        raise InputError("certify-merge needs at least one shard folder", "list the shards' certify output folders")
    configs, rows = [], []
    for folder in folders:
        cfg, part = _read_shard(Path(folder))
        configs.append(cfg)
        rows += part
    common = [{k: v for k, v in c.items() if k != "shard"} for c in configs]
    if any(c != common[0] for c in common[1:]):
        diff = sorted({k for c in common[1:] for k in c if c.get(k) != common[0].get(k)})
        raise InputError(f"the shards were certified with different settings ({', '.join(diff)})",
                         "merge only shards of one certify command (same sigma, n, alpha, images, model)")
    shards = [c.get("shard") for c in configs]
    if len(folders) > 1 or shards[0]:
        ks = {s.split("/")[1] for s in shards if s}
        if None in shards or len(ks) != 1 or sorted(int(s.split("/")[0]) for s in shards) != list(range(int(ks.pop()))):
            raise InputError(f"the shards {shards} are not all k shards 0/k .. k-1/k of one split",
                             "give every shard folder of the run, once")
    indices = [r["index"] for r in rows]
    if len(set(indices)) != len(indices):
        raise InputError("an image appears in more than one shard", "give each shard folder once")
    return CertifyConfig.model_validate({**common[0], "shard": None}), sorted(rows, key=lambda r: r["index"])


@click.command("certify-merge")
@click.argument("shards", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the merged certify.csv, metrics.json and certified_accuracy.png")
def certify_merge(shards: tuple[Path, ...], out: Path) -> None:
    """Merge sharded certify outputs into one result.

    \b
    Example (4 job-array tasks, then one merge):
      deploypipe certify --model M --data D --shard 0/4 --out runs/s0   # ... 1/4, 2/4, 3/4
      deploypipe certify-merge runs/s0/certify runs/s1/certify runs/s2/certify runs/s3/certify --out runs/merged
    """
    cfg, rows = merge_shards(list(shards))
    metrics = summarize(rows, cfg.radii)
    metrics["images"] = float(len(rows))
    tmp = out.with_name(f".{out.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "certify.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves({"merged": rows}, cfg).savefig(tmp / "certified_accuracy.png", dpi=120, bbox_inches="tight")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    click.echo(", ".join(f"r={r:g}: {metrics[f'certified_acc_r{r:g}']:.3f}" for r in cfg.radii)
               + f"; ACR {metrics['acr']:.3f} over {len(rows)} images -> {out}")

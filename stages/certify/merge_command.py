"""The ``deploypipe certify-merge`` command line (what it does is in merge.py, imported when it runs, so
that ``deploypipe --help`` does not import torch)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("certify-merge")
@click.argument("shards", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the merged certify.csv, metrics.json and certified_accuracy.png")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="where the default MLflow store (mlflow.db, mlartifacts/) lives")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, then "
              "sqlite:///<workdir>/mlflow.db)")
@click.option("--experiment", default="deploypipe", show_default=True, help="MLflow experiment name")
def certify_merge(shards: tuple[Path, ...], out: Path, workdir: Path, tracking_uri: str | None,
                  experiment: str) -> None:
    """Merge sharded certify outputs into one result.

    \b
    Example (4 job-array tasks, then one merge):
      deploypipe certify --model M --data D --shard 0/4 --out runs/s0   # ... 1/4, 2/4, 3/4
      deploypipe certify-merge runs/s0/certify runs/s1/certify runs/s2/certify runs/s3/certify --out runs/merged
    """
    from .merge import run_merge

    run_merge(shards, out, workdir, tracking_uri, experiment)

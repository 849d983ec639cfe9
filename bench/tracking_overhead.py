"""How much of the demo's wall time goes to MLflow? (target: <= 3% in MLflow calls)

Runs the demo pipeline (examples/demo.yaml, embedded digits) in-process, into a fresh sqlite store
and then again with --force into the same (warm) store, and prints a table: wall time, time inside
MLflow calls (create runs, params, batched metrics, artifact upload, status), one-time setup (import
mlflow, open/migrate the store, experiment), and their shares. For comparison it also times what
the same metrics would cost sent one `log_metric` call at a time instead of in batches.

    python bench/tracking_overhead.py [--workdir DIR] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    ap.add_argument("--tracking-uri", default=None, help="e.g. http://127.0.0.1:5000 (default: sqlite in workdir)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from deploypipe.config import load_pipeline
    from deploypipe.pipeline import Pipeline

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dp-bench-"))
    cfg = load_pipeline(REPO / "examples" / "demo.yaml")
    rows = []
    for label, force in (("fresh store", False), ("warm store, --force", True)):
        pipe = Pipeline(cfg, workdir, tracking_uri=args.tracking_uri, show_progress=False)
        t0 = time.perf_counter()
        s = pipe.run(force=force)
        wall = time.perf_counter() - t0
        rows.append((label, wall, s.tracking_seconds, s.tracking_calls, s.tracking_setup_seconds, s.run_id))

    # the same per-epoch metrics as single calls, for comparison with the batched path
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}")
    run = client.get_run(rows[-1][-1])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    history = [m for r in children for k in r.data.metrics for m in client.get_metric_history(r.info.run_id, k)]
    probe = client.create_run(run.info.experiment_id, run_name="bench-unbatched-probe")
    t0 = time.perf_counter()
    for m in history:
        client.log_metric(probe.info.run_id, m.key, m.value, step=m.step)
    unbatched = time.perf_counter() - t0
    client.delete_run(probe.info.run_id)

    table = Table(title=f"MLflow overhead of the demo pipeline ({cfg.name}: {', '.join(e.stage for e in cfg.stages)})")
    for col in ("run", "wall s", "in MLflow calls s", "calls", "share", "setup s", "share incl. setup"):
        table.add_column(col, justify="right")
    for label, wall, calls_s, n, setup, _ in rows:
        table.add_row(label, f"{wall:.2f}", f"{calls_s:.3f}", str(n), f"{100 * calls_s / wall:.2f}%", f"{setup:.3f}",
                      f"{100 * (calls_s + setup) / wall:.2f}%")
    Console().print(table)
    print(f"the {len(history)} metric points of the last run sent one log_metric call each: {unbatched:.3f} s "
          f"(batched, they go out in a handful of log_batch calls, included above)")
    print(f"store: {args.tracking_uri or workdir / 'mlflow.db'}")


if __name__ == "__main__":
    sys.exit(main())

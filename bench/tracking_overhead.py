"""How much of the demo's wall time goes to MLflow? (target: <= 3% in MLflow calls)

Runs `deploypipe demo --json` as a user would (a subprocess, wall time measured around it) into a
fresh work directory, then again with --force into the same, now warm, store. The JSON summary
reports the time spent inside MLflow calls (creating runs, params, batched metrics, artifact upload,
status) and the one-time setup (importing mlflow, opening the store — on a fresh sqlite store that
includes MLflow's schema migrations — and the experiment). For comparison it times what the same
metric points would cost sent one `log_metric` call each instead of in batches.

    python bench/tracking_overhead.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)


def run_demo(workdir: Path, force: bool) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "deploypipe.cli", "demo", "--workdir", str(workdir), "--json"] + (["--force"] if force else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir.parent)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"demo failed:\n{res.stderr[-2000:]}")
    return wall, json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, 'Tracking overhead of the demo pipeline').start()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="dp-bench-")) / "runs").resolve()

    rows = [("fresh store", *run_demo(workdir, force=False)), ("warm store, --force", *run_demo(workdir, force=True))]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    summary = rows[-1][2]
    children = client.search_runs([summary["experiment_id"]], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    history = [m for r in children for k in r.data.metrics for m in client.get_metric_history(r.info.run_id, k)]
    probe = client.create_run(summary["experiment_id"], run_name="bench-unbatched-probe")
    t0 = time.perf_counter()
    for m in history:
        client.log_metric(probe.info.run_id, m.key, m.value, step=m.step)
    unbatched = time.perf_counter() - t0
    client.delete_run(probe.info.run_id)

    table = []
    for label, wall, s in rows:
        calls_s, setup_s = s["tracking_seconds"], s["tracking_setup_seconds"]
        table.append([label, f"{wall:.2f}", f"{calls_s:.3f}", str(s["tracking_calls"]), f"{100 * calls_s / wall:.2f}%",
                      f"{setup_s:.3f}", f"{100 * setup_s / wall:.1f}%"])
    print(markdown_table(["run", "wall s", "in MLflow calls s", "calls", "share of wall", "setup s", "setup share"],
                         table, "MLflow overhead of `deploypipe demo` (examples/demo.yaml on digits, local sqlite store)"))
    print("setup = import mlflow + open the store (+ schema migrations when the store is new) + experiment")
    print(f"the {len(history)} metric points of the last run sent one log_metric call each: {unbatched:.3f} s "
          f"(batched, they went out in the few log_batch calls counted above)")
    print(f"store: {workdir / 'mlflow.db'}")
    worst = max(s["tracking_seconds"] / wall for _, wall, s in rows)
    report.finish(headline=f"MLflow calls take at most {100 * worst:.1f}% of the demo's wall time (target < 3%); "
                           f"demo wall time {rows[0][1]:.0f} s into a fresh store, {rows[1][1]:.0f} s rerun")


if __name__ == "__main__":
    main()

"""Run one deploypipe stage command for a benchmark row: a subprocess exactly as a user runs it, its
wall time and peak resident memory (wait4), resumable: the command always runs, and deploypipe's
own resume (the stage key: config, input model, data, seed) skips a stage finished with the same
settings, whose measured wall time and memory are then read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_deploypipe(stage: str, label: str, args: list[str], out: Path, threads: int) -> dict:
    """One ``python -m deploypipe STAGE ... --json`` run as a user would start it; returns its metrics +
    wall time + peak RSS. A stage already finished in ``out`` with the same settings is skipped by
    deploypipe itself (a rerun with other settings, e.g. more images, runs again): its metrics come
    from that result, its wall time and memory from the run that made it."""
    usage_file = out / f"{label}.usage.json"
    cmd = [sys.executable, "-m", "deploypipe", stage, *args, "--workdir", str(out / "work"),
           "--out", str(out / label), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(out / f"{label}.log", "a") as log:  # appended: a resumed stage keeps the log of its start
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} failed (exit {os.waitstatus_to_exitcode(status)}); see {out / f'{label}.log'}")
    outcome = json.loads(stdout.strip().splitlines()[-1])["stages"][0]
    metrics = dict(outcome["metrics"])
    if outcome.get("status") == "skipped":
        metrics.update(json.loads(usage_file.read_text()) if usage_file.is_file()
                       else {"wall_seconds": None, "peak_rss_mb": None})
        print(f"  {label}: (done before, same settings) {_headline(metrics)}", file=sys.stderr, flush=True)
        return metrics
    metrics.update(wall_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    usage_file.write_text(json.dumps({"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}))
    print(f"  {label}: {wall:.0f} s, {_headline(metrics)}", file=sys.stderr, flush=True)
    return metrics


def _headline(metrics: dict) -> str:
    if "test_top1" in metrics:
        return f"test top-1 {metrics['test_top1']:.4f}"
    if "acr" in metrics:
        return f"certified accuracy at r=0 {metrics['certified_acc_r0']:.3f}, ACR {metrics['acr']:.3f}"
    return ""


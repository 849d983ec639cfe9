"""Run one deploypipe stage command for a benchmark row: a subprocess exactly as a user runs it, its
wall time and peak resident memory (wait4), resumable (a finished row is read back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_deploypipe(stage: str, label: str, args: list[str], out: Path, threads: int) -> dict:
    """One ``python -m deploypipe STAGE ... --json`` run as a user would start it; returns its metrics + wall time + peak RSS. A run
    whose result is already in ``out`` (an interrupted benchmark) is read back instead."""
    done, usage_file = out / label / stage / "result.json", out / f"{label}.usage.json"
    if done.is_file():
        metrics = dict(json.loads(done.read_text())["metrics"])
        metrics.update(json.loads(usage_file.read_text()) if usage_file.is_file() else {"wall_seconds": None, "peak_rss_mb": None})
        print(f"  {label}: (done before) {_headline(metrics)}", flush=True)
        return metrics
    cmd = [sys.executable, "-m", "deploypipe", stage, *args, "--workdir", str(out / "work"),
           "--out", str(out / label), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(out / f"{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} failed (exit {os.waitstatus_to_exitcode(status)}); see {out / f'{label}.log'}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    metrics = dict(summary["stages"][0]["metrics"])
    metrics.update(wall_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    usage_file.write_text(json.dumps({"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}))
    print(f"  {label}: {wall:.0f} s, {_headline(metrics)}", flush=True)
    return metrics


def _headline(metrics: dict) -> str:
    if "test_top1" in metrics:
        return f"test top-1 {metrics['test_top1']:.4f}"
    if "acr" in metrics:
        return f"certified accuracy at r=0 {metrics['certified_acc_r0']:.3f}, ACR {metrics['acr']:.3f}"
    return ""


"""How long a newcomer waits: `deploypipe demo` on a fresh work directory, timed with /usr/bin/time
(wall, CPU, peak memory), with each stage's seconds from its JSON summary, and the start-up time of
`deploypipe --help` and of a stage's `--help`. Run it with nothing else on the machine: the figures
are wall-clock.

    python bench/demo.py [--repeats 2] [--report docs/benchmarks/demo.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)

TIME = "/usr/bin/time"


def timed(args: list[str], cwd: Path) -> dict:
    """Run ``deploypipe ARGS`` under /usr/bin/time -v; wall and CPU seconds, peak RSS, stdout."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([TIME, "-v", sys.executable, "-m", "deploypipe", *args], cwd=cwd, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"deploypipe {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", res.stderr).group(1).strip()

    h, m, s = (["0"] + field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"))[-3:]
    return {"wall": int(h) * 3600 + int(m) * 60 + float(s),
            "cpu": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024, "stdout": res.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="fresh demo runs (the median is reported)")
    add_report_argument(ap)
    args = ap.parse_args()
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} not found — fix: apt-get install time")
    report = Report(args.report, "Demo: what a newcomer waits for").start()
    runs, stages = [], {}
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            r = timed(["demo", "--workdir", str(Path(tmp) / "runs"), "--json"], Path(tmp))
            summary = json.loads(r["stdout"].strip().splitlines()[-1])
            for st in summary["stages"]:
                stages.setdefault(st["id"], []).append(st["seconds"])
            runs.append(r)
            print(f"demo run {i + 1}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, {r['rss_mb']:.0f} MB peak",
                  flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        helps = {cmd: timed(cmd.split()[1:], Path(tmp)) for cmd in
                 ("deploypipe --help", "deploypipe quantize --help", "deploypipe stages")}
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_mb")}
    print(f"\n`deploypipe demo` on a fresh work directory, median of {len(runs)} runs: **{med['wall']:.0f} s** wall "
          f"({med['cpu']:.0f} s CPU), {med['rss_mb']:.0f} MB peak memory.\n")
    print(markdown_table(["stage", "seconds (median)"],
                         [[sid, f"{statistics.median(v):.1f}"] for sid, v in stages.items()]))
    print()
    print(markdown_table(["command", "wall s", "peak MB"],
                         [[f"`{cmd}`", f"{r['wall']:.2f}", f"{r['rss_mb']:.0f}"] for cmd, r in helps.items()]))
    report.finish(headline=f"`deploypipe demo` {med['wall']:.0f} s wall on a fresh work directory "
                           f"(median of {len(runs)}); `--help` {helps['deploypipe quantize --help']['wall']:.1f} s")


if __name__ == "__main__":
    main()

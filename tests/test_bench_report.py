"""Bench reports write themselves: a bench script with --report writes its tables under a header
naming the command; bench/summary.py puts each report's headline into the README's results block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_bench_report_reaches_the_readme_summary(tmp_path):
    docs = tmp_path / "docs" / "benchmarks"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "quantize_ip.py"), "--repeats", "1", "--report",
                          str(docs / "quantize_ip.md")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = (docs / "quantize_ip.md").read_text()
    assert report.startswith("# Bit allocation") and "bench/quantize_ip.py --repeats 1 --report" in report
    assert "| min dloss | size <= 0.10 of FP32 | Optimal |" in report  # the printed table, as markdown
    headline = report.split("<!-- headline: ")[1].split(" -->")[0]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin -->\n| stale | row |\n<!-- results:end -->\nafter\n")
    res = subprocess.run([sys.executable, str(REPO / "bench" / "summary.py"), "--readme", str(readme), "--reports",
                          str(docs)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = readme.read_text()
    assert "stale" not in text and text.endswith("<!-- results:end -->\nafter\n")
    assert f"| {headline} | [quantize_ip.md](docs/benchmarks/quantize_ip.md)" in text

"""Benchmark reports that write themselves: ``--report docs/benchmarks/X.md`` on any bench script
keeps everything the script prints (its tables) and writes it, under a header naming the command,
the date and the machine, when the script has finished — so no table in docs/benchmarks/ is ever
edited by hand, and a failed run leaves the last good report in place."""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Optional


def add_report_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--report", default=None, metavar="FILE.md",
                    help="also write what this prints, with the command and the machine, to this markdown file "
                         "(e.g. docs/benchmarks/quantize.md)")


def machine() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cores} CPU cores ({platform.processor() or platform.machine()}), {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buffer_.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Report:
    """``Report(path, title).start()`` at the top of a script, ``.finish(extra)`` at its end."""

    def __init__(self, path: Optional[str], title: str):
        self.path, self.title = (Path(path) if path else None), title
        self._tee: Optional[_Tee] = None

    def start(self) -> "Report":
        if self.path is not None:
            self._tee = _Tee(sys.stdout)
            sys.stdout = self._tee
        return self

    def finish(self, text: Optional[str] = None, headline: Optional[str] = None) -> None:
        """Write the report: ``text`` if given (e.g. the script's results.md), else what it printed.
        ``headline``: the one-line result the README's summary table shows (bench/summary.py)."""
        if self.path is None:
            return
        printed = self._tee.buffer_.getvalue() if self._tee else ""
        if self._tee is not None:
            sys.stdout = self._tee.stream
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
        head = (f"# {self.title}\n\n_Written by `{command}` on {datetime.date.today().isoformat()}; "
                f"{machine()}. Do not edit: rerun the command._\n\n")
        if headline:
            head += f"<!-- headline: {headline} -->\n\n"
        body = text if text is not None else printed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(head + body.rstrip() + "\n")
        os.replace(tmp, self.path)
        print(f"report: {self.path}")


def markdown_table(columns: list[str], rows: list[list], title: str = "") -> str:
    """A markdown table (what the terminal shows and the report keeps)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

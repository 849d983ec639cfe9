"""Rewrite the README's results summary from the generated reports in docs/benchmarks/: one row per
report (its title, the headline its bench script wrote, the date), between the README's
``<!-- results:begin -->`` and ``<!-- results:end -->`` lines. Run after any bench script that
wrote a report, so the README never carries a figure that its report does not.

    python bench/summary.py
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def rows(folder: Path, base: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.md")):
        text = path.read_text()
        title = re.search(r"^# (.+)$", text, re.M)
        headline = re.search(r"<!-- headline: (.+?) -->", text)
        date = re.search(r" on (\d{4}-\d{2}-\d{2});", text)
        if title and headline:
            rel = path.relative_to(base).as_posix()
            out.append(f"| {title[1]} | {headline[1]} | [{path.name}]({rel}) ({date[1] if date else '?'}) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--reports", type=Path, default=ROOT / "docs" / "benchmarks")
    args = ap.parse_args()
    readme = args.readme
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    table = "\n".join(["| benchmark | result | report |", "|---|---|---|",
                        *rows(args.reports, readme.resolve().parent)])
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(table)


if __name__ == "__main__":
    main()

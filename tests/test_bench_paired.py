"""bench/paired_acr.py: radii read alike from a certify CSV, an output folder and an interrupted run's
journal; the paired difference against the statistics module; the verdict's tie rule."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(  # by path: bench/ is scripts, not a package on sys.path
    "paired_acr", Path(__file__).resolve().parent.parent / "bench" / "paired_acr.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
paired_difference, read_radii, verdict = _module.paired_difference, _module.read_radii, _module.verdict

ROWS = [(0, 0.5, 1), (20, 0.25, 0), (40, 0.0, 0), (60, 0.75, 1)]  # index, radius, correct


def test_csv_folder_and_journal_read_alike(tmp_path):
    folder = tmp_path / "certify-rs"
    (folder / "certify").mkdir(parents=True)
    (folder / "certify" / "certify.csv").write_text(
        "index,label,prediction,radius,correct,seconds\n" + "".join(f"{i},3,3,{r},{c},0.1\n" for i, r, c in ROWS))
    running = tmp_path / "certify-drs"
    (running / ".work" / "certify").mkdir(parents=True)
    journal = [{"identity": "x"}, *({"index": i, "radius": r, "correct": c, "seconds": 0.1} for i, r, c in ROWS)]
    (running / ".work" / "certify" / "model.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in journal) + '{"index": 80, "rad')  # cut short
    want = {0: 0.5, 20: 0.0, 40: 0.0, 60: 0.75}
    assert read_radii(folder) == want
    assert read_radii(folder / "certify" / "certify.csv") == want
    assert read_radii(running) == want
    (running / ".work" / "certify" / "other.jsonl").write_text("")
    with pytest.raises(SystemExit, match="2 journals"):
        read_radii(running)


def test_paired_difference_is_the_mean_and_standard_error_over_common_images():
    a = {0: 0.5, 1: 0.0, 2: 0.3, 3: 0.9, 7: 1.0}
    b = {0: 0.6, 1: 0.2, 2: 0.3, 3: 0.4, 9: 2.0}
    d = [b[i] - a[i] for i in (0, 1, 2, 3)]
    mean, se, n = paired_difference(a, b)
    assert n == 4
    assert mean == pytest.approx(statistics.mean(d))
    assert se == pytest.approx(statistics.stdev(d) / 2)
    with pytest.raises(ValueError, match="no test image in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_verdict_calls_a_difference_within_one_standard_error_a_tie():
    assert verdict(0.0003, 0.0028) == "above, but within one standard error: a tie"
    assert verdict(-0.010, 0.005) == "below by 2.0 standard errors"
    assert verdict(0.0, 0.0) == "level: a tie"
    assert verdict(0.01, 0.0) == "above"

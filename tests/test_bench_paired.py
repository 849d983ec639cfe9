"""bench/paired_acr.py: radii read alike from a certify CSV, an output folder and an interrupted run's
journal; the paired difference against the statistics module; the verdict's tie rule; the accounting
of DRS against RS against hand-computed parts."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(  # by path: bench/ is scripts, not a package on sys.path
    "paired_acr", Path(__file__).resolve().parent.parent / "bench" / "paired_acr.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
paired_difference, read_radii, verdict = _module.paired_difference, _module.read_radii, _module.verdict
drs_against_rs, run_config = _module.drs_against_rs, _module.run_config

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


def test_drs_against_rs_splits_the_difference_into_parts_that_sum_to_it(tmp_path):
    s_rs, s_drs = 0.25, 0.18
    c = {0: 2.0, 1: 1.0, 2: 0.5, 4: 3.0}       # RS: Phi^-1 of its bound where it certifies correctly
    m = {0: 2.5, 1: 0.5, 3: 1.5, 4: 3.0}       # DRS: the mean of its sides' Phi^-1
    rs = {i: s_rs * c.get(i, 0.0) for i in range(6)}
    drs = {i: s_drs * math.sqrt(2) * m.get(i, 0.0) for i in range(6)}
    p = drs_against_rs(rs, drs, s_rs, s_drs)
    k = 0.18 * math.sqrt(2) / 0.25
    assert p["k"] == pytest.approx(k) and p["both"] == 3  # images 0, 1, 4
    assert p["rs_confidence"] == pytest.approx((2.0 + 1.0 + 3.0) / 3)
    assert p["drs_confidence"] == pytest.approx((2.5 + 0.5 + 3.0) / 3)
    # by hand, over the 6 images: at the same confidence DRS gets k times RS's radius
    assert p["noise_scale"] == pytest.approx(s_rs * (k - 1) * (2.5 + 0.5 + 3.0) / 6)
    assert p["confidence"] == pytest.approx(s_rs * ((2.5 - 2.0) + (0.5 - 1.0) + (3.0 - 3.0)) / 6)
    assert (p["drs_only"], p["drs_only_images"]) == (pytest.approx(s_drs * math.sqrt(2) * 1.5 / 6), 1)
    assert (p["rs_only"], p["rs_only_images"]) == (pytest.approx(-s_rs * 0.5 / 6), 1)
    total = p["noise_scale"] + p["confidence"] + p["drs_only"] + p["rs_only"]
    assert total == pytest.approx(paired_difference(rs, drs)[0])
    # at exactly matched noise the scale part vanishes
    assert drs_against_rs(rs, drs, s_rs, s_rs / math.sqrt(2))["noise_scale"] == pytest.approx(0.0, abs=1e-15)
    # the method and sigma come from the config.yaml beside a finished run's table; a journal has none
    run = tmp_path / "certify-drs" / "certify"
    run.mkdir(parents=True)
    (run / "certify.csv").write_text("index,label,prediction,radius,correct,seconds\n")
    (run / "config.yaml").write_text("certify:\n  method: drs\n  sigma: 0.18\n")
    assert run_config(run.parent) == run_config(run / "certify.csv") == {"method": "drs", "sigma": 0.18}
    assert run_config(tmp_path / "x.jsonl") is None and run_config(tmp_path) is None

"""bench/runner.py: a benchmark step is read back only when deploypipe itself finds it finished with
the same settings; a rerun with other settings (e.g. more certified images) runs again."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(  # by path: bench/ is scripts, not a package on sys.path
    "bench_runner", Path(__file__).resolve().parent.parent / "bench" / "runner.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
run_deploypipe = _module.run_deploypipe


def test_a_finished_step_is_read_back_only_with_the_same_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the step's own store under tmp_path
    args = ["--model", "zoo:digits_cnn", "--data", "digits", "--limit-test", "100", "--latency-warmup", "0"]
    first = run_deploypipe("evaluate", "eval", [*args, "--latency-repeats", "1"], tmp_path, threads=1)
    assert "done before" not in capsys.readouterr().err
    usage = json.loads((tmp_path / "eval.usage.json").read_text())
    again = run_deploypipe("evaluate", "eval", [*args, "--latency-repeats", "1"], tmp_path, threads=1)
    assert "(done before, same settings)" in capsys.readouterr().err
    assert again["wall_seconds"] == usage["wall_seconds"] == first["wall_seconds"]  # the run that made it
    assert again["test_top1"] == first["test_top1"]
    other = run_deploypipe("evaluate", "eval", [*args, "--latency-repeats", "2"], tmp_path, threads=1)  # other settings
    assert "done before" not in capsys.readouterr().err
    assert other["wall_seconds"] != first["wall_seconds"]
    assert json.loads((tmp_path / "eval.usage.json").read_text())["wall_seconds"] == other["wall_seconds"]

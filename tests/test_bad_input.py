"""Every kind of bad input: one line naming the problem and the fix, exit code 2, no traceback,
nothing written. A few cases start the real `deploypipe` process (so nothing printed at start-up, such
as import warnings, adds a line); the rest call the same entry point in this process (~4 s less each)."""

import textwrap

import pytest
import torch

from conftest import free_port, run_cli, run_main

GOOD = """\
name: bad
model: zoo:digits_cnn
data: digits
stages:
  - train: {epochs: 1}
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def cases(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty_classes" / "train" / "cat").mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    port = free_port()  # nothing listens there
    return {
        "missing config": (["run", "nope.yaml"], "does not exist"),
        "yaml syntax": (["run", write(tmp_path, "syntax.yaml", GOOD.replace("{epochs: 1}", "{epochs: 1"))], ":6:"),
        "unknown stage": (["run", write(tmp_path, "stage.yaml", GOOD.replace("train:", "trian:"))], "unknown stage 'trian'"),
        "unknown key": (["run", write(tmp_path, "key.yaml", GOOD.replace("epochs", "epohcs"))], "did you mean 'epochs'"),
        "wrong type": (["run", write(tmp_path, "type.yaml", GOOD.replace("epochs: 1", "epochs: many"))], "train.epochs = 'many'"),
        "unknown top-level key": (["run", write(tmp_path, "top.yaml", GOOD + "trackng: {}\n")], "trackng: unknown key"),
        "missing model folder": (["evaluate", "--model", "models/missing", "--data", "digits"], "does not exist"),
        "missing checkpoint": (["evaluate", "--model", "zoo:digits_cnn", "--checkpoint", "missing.pt"], "does not exist"),
        "checkpoint mismatch": (["evaluate", "--model", "zoo:digits_cnn", "--checkpoint", str(tmp_path / "wrong.pt")],
                                "does not fit"),
        "missing data path": (["evaluate", "--model", "zoo:resnet20", "--data", "imagefolder:no/such/dir"], "does not exist"),
        "empty dataset folder": (["evaluate", "--model", "zoo:resnet20", "--data", f"imagefolder:{tmp_path / 'empty_classes'}"],
                                 "has no images"),
        "empty train folder": (["evaluate", "--model", "zoo:resnet20", "--data", f"imagefolder:{tmp_path / 'empty'}"],
                               "has no images"),
        "unreachable tracking server": (["evaluate", "--model", "zoo:digits_cnn", "--tracking-uri", f"http://127.0.0.1:{port}"],
                                        "unreachable"),
        "unknown CLI option": (["train", "--model", "zoo:digits_cnn", "--epohcs", "3"], "--epohcs"),
        "bad option value": (["train", "--model", "zoo:digits_cnn", "--epochs", "three"], "three"),
        "unknown device": (["evaluate", "--model", "zoo:digits_cnn", "--device", "tpu"], "device"),
        "ui without a store": (["ui", "--workdir", "nowhere"], "no MLflow store"),
        "bad N:M pattern": (["sparsify", "--model", "zoo:digits_cnn", "--data", "digits", "--pattern", "4:4"], "0 < N < M"),
        "SDGF schedule off target": (["sparsify", "--model", "zoo:digits_cnn", "--data", "digits", "--pattern", "1:8",
                                      "--recipe", "sdgf", "--schedule", "4:8,2:8"], "must end at the target pattern 1:8"),
        "bad decay": (["sparsify", "--model", "zoo:digits_cnn", "--data", "digits", "--decay", "cubic:1"], "is not a decay"),
        "check-sparsity missing file": (["check-sparsity", "missing.onnx", "--pattern", "2:4"], "does not exist"),
        "check-sparsity ONNX without pattern": (["check-sparsity", write(tmp_path, "m.onnx", "x")], "needs the pattern"),
        "flag value out of range": (["quantize", "--model", "zoo:digits_cnn", "--weight-bits", "9"], "--weight-bits 9:"),
        "data flag out of range": (["quantize", "--model", "zoo:digits_cnn", "--calib-size", "0"], "--calib-size 0:"),
        "flags that do not go together": (["quantize", "--model", "zoo:digits_cnn", "--budget", "0.1"],
                                          "budget need(s) bit_candidates"),
    }


CASE_NAMES = ["missing config", "yaml syntax", "unknown stage", "unknown key", "wrong type", "unknown top-level key",
              "missing model folder", "missing checkpoint", "checkpoint mismatch", "missing data path",
              "empty dataset folder", "empty train folder", "unreachable tracking server", "unknown CLI option",
              "bad option value", "unknown device", "ui without a store", "bad N:M pattern", "SDGF schedule off target",
              "bad decay", "check-sparsity missing file", "check-sparsity ONNX without pattern",
              "flag value out of range", "data flag out of range", "flags that do not go together"]


# one of each kind of check: the config file, the command line, the tracking server, the checkpoint, a stage option
IN_A_PROCESS = {"yaml syntax", "unknown CLI option", "unreachable tracking server", "checkpoint mismatch", "bad N:M pattern"}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    args, expected = cases(tmp_path)[case]
    standalone = ("ui", "check-sparsity")  # commands without a work directory
    args = [*args, "--workdir", "runs"] if args[0] not in standalone else args
    if case in IN_A_PROCESS:
        res = run_cli(*args, cwd=tmp_path)
        code, stderr = res.returncode, res.stderr
    else:
        code, _, stderr = run_main(*args, cwd=tmp_path)
    assert code == 2, (case, code, stderr[-2000:])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, (case, stderr)
    assert lines[0].startswith("error: ") and expected in lines[0], (case, lines[0])
    assert "Traceback" not in stderr
    assert " fix: " in lines[0] or "--help" in lines[0], lines[0]
    assert "stages[0]" not in lines[0] or args[0] == "run", lines[0]  # a stage command names the flag typed
    assert not (tmp_path / "runs").exists(), "bad input must not leave a work directory behind"


@pytest.mark.parametrize("later, says", [
    ("- quantize: {bit_candidates: [4, 8], budget: 0.02}", "budget 0.02 of the FP32 size is infeasible"),
    ("- certify: {onnx: elsewhere/model.onnx, n: 20, n0: 10, num_images: 2}", "certify onnx 'elsewhere/model.onnx' does not exist"),
    ("- certify: {reference: no/model, n: 20, n0: 10, num_images: 2}", "certify reference 'no/model' does not exist"),
    ("- quantize: {bit_candidates: [4, 8], budget: 0.3, max_acr_loss: 0.1, sigma: 0.25}",
     "training images lie outside the calibration set"),
])
def test_a_later_stages_mistake_is_refused_before_the_first_stage_runs(tmp_path, later, says):
    """Checks that need no computation run for every stage before the first one starts: a bad budget or
    path in the last stage costs no training."""
    data = "{source: digits, limit_train: 300, calib_size: 295}" if "max_acr_loss" in later else "digits"
    config = write(tmp_path, "late.yaml", f"""\
        name: late
        model: zoo:digits_cnn
        data: {data}
        stages:
          - train: {{epochs: 1}}
          {later}
        """)
    code, _, err = run_main("run", config, "--workdir", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert says in err and "fix:" in err
    assert not (tmp_path / "runs" / "late" / "train").exists()  # train never started


def test_a_file_an_earlier_stage_writes_passes_the_preflight(tmp_path):
    from deploypipe.config import PipelineConfig
    from deploypipe.pipeline import Pipeline, RunOptions

    cfg = PipelineConfig.model_validate({
        "name": "p", "model": "zoo:digits_cnn", "data": {"source": "digits", "limit_train": 200, "limit_test": 50},
        "stages": [{"quantize": {"method": "rtn"}},
                   {"certify": {"onnx": str(tmp_path / "runs" / "p" / "quantize" / "model.onnx"), "n": 20, "n0": 10,
                                "num_images": 2}}]})
    Pipeline(cfg, RunOptions(workdir=tmp_path / "runs"))._preflight(0)  # no error: quantize writes that file

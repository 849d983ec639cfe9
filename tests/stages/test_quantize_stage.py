"""The quantize stage in a pipeline: first/last layers at 8 bits, weights on their grids, AdaQuant
no worse than round-to-nearest on the calibration objective, and a model that reloads exactly."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from conftest import last_json, run_cli, run_main
from deploypipe.config import PipelineConfig, validate
from deploypipe.evaluation import top1_and_loss
from deploypipe.models import load_model
from deploypipe.pipeline import Pipeline, RunOptions
from deploypipe.stages.quantize.modules import QuantLayer, fold_batchnorm
from deploypipe.stages.quantize.quantizer import qrange, quantize_codes


def config(quantize):
    return validate(PipelineConfig, {
        "name": "q", "model": "zoo:digits_cnn", "data": {"source": "digits", "calib_size": 128},
        "stages": [{"train": {"epochs": 6, "batch_size": 64, "lr": 0.05}}, {"quantize": quantize}]}, "test")


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_quantize_stage_end_to_end(workdir, mode):
    tuning = {"bn_tuning": True, "bias_tuning": True, "bias_steps": 100} if mode == "sequential" else {}
    cfg = config({"weight_bits": 3, "act_bits": 4, "method": "adaquant", "mode": mode, "iters": 150,
                  "lr_weight": 1e-4, **tuning})
    pipe = Pipeline(cfg, RunOptions(workdir, show_progress=False))
    summary = pipe.run()
    m = summary.stages[1].metrics
    assert m["size_fraction_of_fp32"] < 0.2 and m["cache_peak_mb"] > 0
    model = load_model(workdir / "q" / "quantize" / "model")
    qlayers = {n: mod for n, mod in model.named_modules() if isinstance(mod, QuantLayer)}
    names = list(qlayers)
    assert (qlayers[names[0]].w_bits, qlayers[names[-1]].w_bits) == (8, 8)  # first and last kept at 8 bits
    assert all(qlayers[n].w_bits == 3 and qlayers[n].a_bits == 4 for n in names[1:-1])
    for q in qlayers.values():  # every weight sits on its grid: codes * scale reproduce it
        codes = quantize_codes(q.layer.weight, q.weight_scale, q.w_bits, axis=0)
        assert codes.abs().max() <= qrange(q.w_bits)[1]
        scale = q.weight_scale.view(-1, *[1] * (codes.ndim - 1))
        torch.testing.assert_close(codes.float() * scale, q.quantized_weight())
    top1, loss = top1_and_loss(model, pipe.data.test)  # reload reproduces the reported accuracy
    assert top1 == pytest.approx(m["test_top1"]) and loss == pytest.approx(m["test_loss"], rel=1e-5)
    fp = load_model(workdir / "q" / "train" / "model").eval()
    x_calib = pipe.data.calib.as_float(pipe.data.calib.images)
    if tuning:  # the reported KL after bias tuning is the saved model's, measured here independently
        assert {"bn_top1", "bias_top1"} <= set(m)
        with torch.no_grad():
            kl = F.kl_div(F.log_softmax(model(x_calib), 1), F.log_softmax(fp(x_calib), 1), log_target=True,
                          reduction="sum").item() / len(x_calib)
        assert kl == pytest.approx(m["bias_kl_after"], rel=1e-3)
        assert m["test_top1"] == m["bias_top1"]
        assert (workdir / "q" / "quantize" / "bn_reestimation.csv").is_file()
    rows = list(csv.DictReader(open(workdir / "q" / "quantize" / "layers.csv")))
    assert [r["layer"] for r in rows] == names
    if mode == "parallel":  # each layer's reported MSE is the saved layer's on the FP inputs, recomputed here
        folded = copy.deepcopy(fp)
        fold_batchnorm(folded)
        mse = {}
        for r in rows:
            seen = {}
            hook = folded.get_submodule(r["layer"]).register_forward_hook(
                lambda _m, inputs, out: seen.update(x=inputs[0], y=out))
            with torch.no_grad():
                folded(x_calib)
                hook.remove()
                out, target = qlayers[r["layer"]](seen["x"]), seen["y"]
                if r["relu_target"] == "True":
                    out, target = F.relu(out), F.relu(target)
            mse[r["layer"]] = F.mse_loss(out, target).item()
            assert mse[r["layer"]] == pytest.approx(float(r["mse_adaquant"]), rel=1e-3), r["layer"]
        # and AdaQuant really improved the 3-bit layers on round-to-nearest (its guard only stops it doing worse)
        low = [r for r in rows if r["w_bits"] == "3"]
        assert low and all(mse[r["layer"]] < 0.9 * float(r["mse_rtn"]) for r in low), [
            (mse[r["layer"]], float(r["mse_rtn"])) for r in rows]
    assert (workdir / "q" / "quantize" / "layer_mse.png").is_file()
    assert (workdir / "q" / "quantize" / "model.onnx").is_file() and m["onnx_top1_agreement"] >= 0.99


@pytest.mark.usefixtures("cli_store")
def test_quantize_command_on_a_saved_model(tmp_path):
    res = run_cli("train", "--model", "zoo:digits_cnn", "--epochs", "3", "--lr", "0.05", "--out", "out", "--json",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    model_dir = last_json(res.stdout)["stages"][0]["model"]
    res = run_cli("quantize", "--model", model_dir, "--weight-bits", "4", "--act-bits", "8", "--method", "rtn",
                  "--calib-size", "64", "--out", "out", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    m = last_json(res.stdout)["stages"][0]["metrics"]
    assert m["rtn_top1"] == m["test_top1"] and "adaquant_top1" not in m
    res = run_cli("quantize", "--model", model_dir, "--weight-bits", "4", "--act-bits", "null", "--method", "rtn",
                  "--calib-size", "64", "--no-export-onnx", "--out", "wonly", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]  # 'null' on the command line = weight-only
    rows = list(csv.DictReader(open(tmp_path / "wonly" / "quantize" / "layers.csv")))
    assert [r["a_bits"] for r in rows] == [""] * len(rows) and rows[1]["w_bits"] == "4"
    code, _, err = run_main("quantize", "--model", model_dir, "--exclude", "*", "--out", "out", cwd=tmp_path)
    last = err.strip().splitlines()[-1]  # the error is one line, after the stage's log
    assert code == 2 and last.startswith("error: ") and "no layer matches" in last and "fix: widen" in last


def test_capture_is_not_changed_by_inplace_ops_downstream():
    from torch import nn

    from deploypipe.stages.quantize.calibrate import capture

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    x = torch.randn(64, 4)
    _, y = capture(model, "0", lambda: [x])
    torch.testing.assert_close(y, model[0](x))  # the pre-ReLU output, negatives included
    assert (y < 0).any()


@pytest.mark.parametrize("method", ["rtn", "adaquant"])
def test_mixed_precision_is_optimal_for_the_measured_deltas_and_reports_infeasible_budgets(workdir, method):
    import itertools
    import math

    from deploypipe.errors import InputError

    quant = {"act_bits": 8, "method": method, "iters": 30, "bit_candidates": [2, 4, 8], "budget": 0.12}
    pipe = Pipeline(config({**quant, "sweep": [0.2, 0.09, 0.12, 0.01]}), RunOptions(workdir, show_progress=False))
    m = pipe.run().stages[1].metrics
    front = list(csv.DictReader(open(workdir / "q" / "quantize" / "pareto.csv")))
    assert [float(r["budget"]) for r in front] == [0.09, 0.12, 0.2]  # 0.01 is infeasible: skipped
    assert all(float(r["size_fraction_of_fp32"]) <= float(r["budget"]) + 1e-9 for r in front)
    predicted = [float(r["predicted_dloss"]) for r in front]
    assert predicted == sorted(predicted, reverse=True)  # a larger budget never has a worse optimum
    assert (workdir / "q" / "quantize" / "pareto.png").is_file()
    same = next(r for r in front if float(r["budget"]) == 0.12)  # the sweep point at the chosen budget is the output
    assert float(same["test_top1"]) == pytest.approx(m["test_top1"])
    assert m["size_fraction_of_fp32"] <= 0.12 + 1e-9
    rows = list(csv.DictReader(open(workdir / "q" / "quantize" / "bit_allocation.csv")))
    fp_bits, q_bits = 8 * m["fp32_bytes"], 8 * m["quantized_bytes"]
    fixed = q_bits - sum(float(r["cost"]) for r in rows)
    best = min((sum(float(r[f"dloss_w{b}"]) for r, b in zip(rows, combo)), combo)
               for combo in itertools.product([2, 4, 8], repeat=len(rows))
               if sum(b * int(r["params"]) for r, b in zip(rows, combo)) <= 0.12 * fp_bits - fixed)
    chosen = sum(float(r[f"dloss_w{r['bits']}"]) for r in rows)
    assert chosen == pytest.approx(best[0], abs=1e-9)  # the program's choice is the brute-force optimum
    model = load_model(workdir / "q" / "quantize" / "model")
    assert [model.get_submodule(r["layer"]).w_bits for r in rows] == [int(r["bits"]) for r in rows]
    smallest = (fixed + sum(2 * int(r["params"]) for r in rows)) / fp_bits
    with pytest.raises(InputError, match=f"smallest feasible budget .* is {math.ceil(smallest * 1e4) / 1e4}"):
        Pipeline(config({**quant, "budget": 0.03}), RunOptions(workdir, out_dir=workdir / "tight", show_progress=False)).run()
    assert not (workdir / "tight" / "quantize").exists()


def test_transformer_encoder_quantizes_end_to_end(workdir):
    """A small ViT (pre-norm encoder blocks of nn.Linear) through train -> quantize: every Linear and
    the patch embedding are quantized, AdaQuant runs on them, and the result reloads exactly."""
    vit = {"spec": "zoo:vit_tiny", "kwargs": {"patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}}
    cfg = validate(PipelineConfig, {
        "name": "vit", "model": vit, "data": {"source": "digits", "calib_size": 128},
        "stages": [{"train": {"epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05}},
                   {"quantize": {"weight_bits": 4, "act_bits": 8, "iters": 40, "lr_weight": 1e-4}}]}, "test")
    pipe = Pipeline(cfg, RunOptions(workdir, show_progress=False))
    m = pipe.run().stages[1].metrics
    model = load_model(workdir / "vit" / "quantize" / "model")
    qlayers = [n for n, mod in model.named_modules() if isinstance(mod, QuantLayer)]
    assert qlayers[0] == "patch_embed" and qlayers[-1] == "head" and len(qlayers) == 1 + 2 * 4 + 1
    assert all(model.get_submodule(n).w_bits == 4 for n in qlayers[1:-1])
    rows = list(csv.DictReader(open(workdir / "vit" / "quantize" / "layers.csv")))
    assert sum(float(r["mse_adaquant"]) < float(r["mse_rtn"]) for r in rows) >= len(rows) // 2  # not just reverted
    assert top1_and_loss(model, pipe.data.test)[0] == pytest.approx(m["test_top1"])
    assert m["test_top1"] >= m["fp_top1"] - 0.05


def test_unsigned_grids_only_where_inputs_are_never_negative(workdir):
    cfg = config({"method": "rtn", "unsigned_activations": True, "export_onnx": False})
    Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    rows = {r["layer"]: r["a_signed"] for r in csv.DictReader(open(workdir / "q" / "quantize" / "layers.csv"))}
    # digits_cnn: the first conv sees normalised (signed) pixels; every later layer follows a ReLU
    assert rows == {"1": "True", "4": "False", "8": "False", "13": "False"}


def test_certified_constraint_in_the_stage_logs_every_round(workdir):
    """The stage path of max_acr_loss: the selection subset comes from training images outside the
    calibration set, every certified round is a row of robust_rounds.csv, a point of robust_rounds.png
    and one MLflow step."""
    from mlflow import MlflowClient

    quant = {"act_bits": 8, "method": "rtn", "bit_candidates": [2, 8], "budget": 0.2, "sensitivity": "noisy",
             "sigma": 0.25, "max_acr_loss": 0.0, "selection_images": 30, "selection_n": 100, "selection_n0": 10,
             "export_onnx": False}
    summary = Pipeline(config(quant), RunOptions(workdir, show_progress=False)).run()
    out = workdir / "q" / "quantize"
    rounds = list(csv.DictReader(open(out / "robust_rounds.csv")))
    assert 1 <= len(rounds) <= 4 and sum(r["chosen"] == "True" for r in rounds) == 1
    chosen = next(r for r in rounds if r["chosen"] == "True")
    assert chosen["holds"] == "True" and float(chosen["acr_loss"]) <= 1e-12
    assert (out / "robust_rounds.png").stat().st_size > 10_000
    m = summary.stages[1].metrics
    assert m["robust_rounds"] == len(rounds) and m["selection_acr"] == pytest.approx(float(chosen["acr"]))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    steps = [h.step for h in client.get_metric_history(summary.stages[1].run_id, "acr_loss")]
    assert steps == list(range(1, len(rounds) + 1))

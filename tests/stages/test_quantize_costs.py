"""Mixed-precision costs: MACs and BOPs against hand counts, the latency table reader, the "keep in
FP16" candidate, and the program's choice equal to brute force under a BOPs budget and under a
latency budget — in the stage, with the model reloading at the chosen precisions."""

import csv
import itertools

import pytest
import torch
from torch import nn

from deploypipe.config import PipelineConfig, validate
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.models import load_model
from deploypipe.pipeline import Pipeline, RunOptions
from deploypipe.stages.quantize.mixed_precision import cost_table, layer_macs, model_bops, read_latency_table
from deploypipe.stages.quantize.modules import QuantLayer, wrap_layers
from deploypipe.stages.quantize.quantizer import FP16
from deploypipe.stages.quantize.config import QuantizeConfig


def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, groups=2),
                         nn.Flatten(), nn.Linear(6 * 3 * 3, 10))


def test_macs_and_bops_by_hand():
    model = tiny()
    macs = layer_macs(model, ["0", "2", "4"], (1, 8, 8))
    # conv: out elements x (in/groups x kh x kw); linear: out x in
    assert macs == {"0": 4 * 8 * 8 * 9, "2": 6 * 3 * 3 * (2 * 9), "4": 10 * 54}
    assert model_bops(model, macs) == 32 * 32 * sum(macs.values())
    q = wrap_layers(model, {"0": {"w_bits": 8, "a_bits": 8}, "2": {"w_bits": 4, "a_bits": 6},
                            "4": {"w_bits": FP16, "a_bits": FP16}})
    assert model_bops(q, macs) == 64 * macs["0"] + 24 * macs["2"] + 256 * macs["4"]
    assert layer_macs(q, ["0", "2", "4"], (1, 8, 8)) == macs  # the same through the wrappers


def test_costs_of_an_n_m_sparse_layer_count_the_compressed_weights():
    model = tiny()
    macs = layer_macs(model, ["0", "2", "4"], (1, 8, 8))
    a_bits = {"0": 8, "2": 8, "4": 8}
    dense = cost_table("size", model, ["0", "4"], [4, 8], a_bits)
    sparse = cost_table("size", model, ["0", "4"], [4, 8], a_bits, sparse={"4": "1:8"})
    assert sparse["0"] == dense["0"] == {4: 4.0 * 36, 8: 8.0 * 36}
    assert sparse["4"] == {4: (4 + 3) / 8 * 540, 8: (8 + 3) / 8 * 540}  # 1 value + a 3-bit position per 8 weights
    bops = cost_table("bops", model, ["4"], [4], a_bits, macs, sparse={"4": "2:4"})
    assert bops["4"][4] == 0.5 * macs["4"] * 4 * 8


def test_fp16_layer_rounds_weights_and_inputs_to_half_precision():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3).double()
    q = QuantLayer(lin, FP16, FP16)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = x.half().double() @ lin.weight.half().double().T + lin.bias  # bias stays in full precision
    torch.testing.assert_close(q(x), expected)


def test_latency_table_reader(tmp_path):
    good = tmp_path / "lat.csv"
    good.write_text("layer,bits,ms\nconv,4,0.5\nconv,fp16,0.9\nconv,16,0.9\nfc,8,0.25\n")
    assert read_latency_table(str(good)) == {("conv", 4): 0.5, ("conv", FP16): 0.9, ("fc", 8): 0.25}
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,bits,ms\nconv,four,0.5\n")
    with pytest.raises(ValueError, match="line 2 is not layer,bits,ms"):
        read_latency_table(str(bad))
    with pytest.raises(ValueError, match="cannot read the latency table"):
        read_latency_table(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("cfg, message", [
    ({"bit_candidates": [4, 8], "avg_bits": 5, "cost": "bops"}, "avg_bits limits weight storage"),
    ({"bit_candidates": [4, 8], "max_latency_ms": 1.0}, "max_latency_ms needs cost latency"),
    ({"bit_candidates": [4, 8], "cost": "latency", "max_latency_ms": 1.0}, "needs latency_table"),
    ({"bit_candidates": [4, 8], "budget": 0.2, "max_loss": 0.1}, "exactly one of"),
    ({"bit_candidates": ["fp16"], "budget": 0.2}, "bit_candidates must be"),
    ({"bit_candidates": [4, 9], "budget": 0.2}, "bit_candidates must be"),
    ({"avg_bits": 4}, "need"),
])
def test_cost_options_are_checked(cfg, message):
    with pytest.raises(InputError, match=message):
        validate(QuantizeConfig, cfg, "quantize")


def config(quantize):
    return validate(PipelineConfig, {
        "name": "q", "model": "zoo:digits_cnn", "data": {"source": "digits", "calib_size": 128, "limit_test": 200},
        "stages": [{"train": {"epochs": 4, "batch_size": 64, "lr": 0.05}}, {"quantize": quantize}]}, "test")


def brute_force(rows, cost_of, limit):
    """The least total dloss over every choice of one precision per layer within the limit."""
    options = [[p for p in ("w4", "w8", "fp16")] for _ in rows]
    best = None
    for combo in itertools.product(*options):
        cost = sum(cost_of(r, p) for r, p in zip(rows, combo))
        if cost <= limit + 1e-9:
            loss = sum(float(r[f"dloss_{p}"]) for r, p in zip(rows, combo))
            best = loss if best is None else min(best, loss)
    return best


def _bits(p):
    return FP16 if p == "fp16" else int(p[1:])


def test_bops_budget_with_an_fp16_candidate_is_the_brute_force_optimum(workdir):
    quant = {"act_bits": 8, "method": "rtn", "bit_candidates": [4, 8, "fp16"], "cost": "bops", "budget": 0.12}
    pipe = Pipeline(config(quant), RunOptions(workdir, show_progress=False))
    m = pipe.run().stages[1].metrics
    rows = list(csv.DictReader(open(workdir / "q" / "quantize" / "bit_allocation.csv")))
    assert {r["cost_kind"] for r in rows} == {"bops"}

    def bops(r, p):
        return int(r["macs"]) * _bits(p) * (FP16 if p == "fp16" else 8)

    for r in rows:  # the cost the program saw is MACs x w bits x a bits
        assert float(r["cost"]) == bops(r, r["precision"])
    # the budget left for the program's layers: 12% of FP32 BOPs minus the first/last layers' (8 x 8)
    model = load_model(workdir / "q" / "quantize" / "model")
    macs = layer_macs(model, [n for n, mod in model.named_modules() if isinstance(mod, QuantLayer)], (1, 8, 8))
    fp_bops = 32 * 32 * sum(macs.values())
    fixed = sum(64 * n for name, n in macs.items() if name not in {r["layer"] for r in rows})
    chosen = sum(float(r[f"dloss_{r['precision']}"]) for r in rows)
    assert chosen == pytest.approx(brute_force(rows, bops, 0.12 * fp_bops - fixed), abs=1e-9)
    assert m["bops_fraction_of_fp32"] <= 0.12 + 1e-9
    assert m["bops_fraction_of_fp32"] == pytest.approx(model_bops(model, macs) / fp_bops)
    for r in rows:  # reloads at the chosen precisions, FP16 layers with FP16 inputs
        layer = model.get_submodule(r["layer"])
        assert layer.w_bits == _bits(r["precision"])
        assert (layer.a_bits == FP16) == (r["precision"] == "fp16")
    assert top1_and_loss(model, pipe.data.test)[1] == pytest.approx(m["test_loss"], rel=1e-5)
    assert m["onnx_exact_top1_agreement"] >= 0.99


def test_latency_table_budget_is_the_brute_force_optimum_and_fp16_can_win(workdir, tmp_path):
    names = ["4", "8"]  # digits_cnn's middle layers (the first and last stay at 8 bits)
    table = tmp_path / "latency.csv"
    ms = {"w4": 1.0, "w8": 1.5, "fp16": 1.2}  # e.g. a target whose INT8 path is slow for these shapes
    table.write_text("layer,bits,ms\n" + "".join(f"{n},{p[1:] if p != 'fp16' else 'fp16'},{ms[p] * (i + 1)}\n"
                                                   for i, n in enumerate(names) for p in ms))
    quant = {"act_bits": 8, "method": "rtn", "bit_candidates": [4, 8, "fp16"], "cost": "latency",
             "latency_table": str(table), "max_latency_ms": 3.7}
    m = Pipeline(config(quant), RunOptions(workdir, show_progress=False)).run().stages[1].metrics
    rows = list(csv.DictReader(open(workdir / "q" / "quantize" / "bit_allocation.csv")))
    assert [r["layer"] for r in rows] == names

    def latency(r, p):
        return ms[p] * (names.index(r["layer"]) + 1)

    chosen = sum(float(r[f"dloss_{r['precision']}"]) for r in rows)
    assert chosen == pytest.approx(brute_force(rows, latency, 3.7), abs=1e-9)
    assert m["ip_max_latency_ms"] == pytest.approx(sum(latency(r, r["precision"]) for r in rows)) and m["ip_max_latency_ms"] <= 3.7
    with pytest.raises(InputError, match="smallest feasible max_latency_ms .* is 3.0"):
        Pipeline(config({**quant, "max_latency_ms": 2.0}), RunOptions(workdir, out_dir=workdir / "tight", show_progress=False)).run()
    table.write_text("layer,bits,ms\n4,4,1.0\n")
    with pytest.raises(InputError, match="no entry for layer 4 at w8"):
        Pipeline(config(quant), RunOptions(workdir, out_dir=workdir / "partial", show_progress=False)).run()


def test_storage_bytes_counts_quantized_weights_at_their_bits():
    from deploypipe.evaluation import storage_bytes

    model = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fp = 4 * (40 + 4) + 4 * (4 + 4 + 4 + 4) + 8 + 4 * (8 + 2)  # fp32 params, BN running stats, int64 counter
    assert storage_bytes(model) == fp
    wrap_layers(model, {"0": {"w_bits": 4, "a_bits": 8}, "2": {"w_bits": FP16, "a_bits": FP16}})
    # layer 0: 4-bit weights + 4 fp32 channel scales + fp32 bias + the input scale; layer 2: fp16 weights, fp32 bias
    assert storage_bytes(model) == (4 * 40 + 32 * 4 + 32 * 4 + 32) / 8 + 4 * (4 + 4 + 4 + 4) + 8 + (16 * 8 + 32 * 2) / 8

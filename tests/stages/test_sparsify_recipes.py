"""Sparsify recipes: decay and structure schedules at their phase boundaries, the conv grouping
against a loop over kernel positions, gradients of the sparse layer against autograd on the reference
formulas, the checker (models and ONNX), and quantize keeping the pattern."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deploypipe.stages.sparsify.checker import check_model, check_onnx, violating_groups
from deploypipe.stages.sparsify.patterns import (Pattern, from_reduction_view, reduction_view, select_sparse_layers)
from deploypipe.stages.sparsify.schedules import Decay, Recipe, default_schedule, parse_schedule
from deploypipe.stages.sparsify.sparse_layer import NMSparse, harden, set_state, wrap_sparse


# --------------------------------------------------------------------------- schedules
def test_decay_closed_forms_and_parsing():
    exp, lin = Decay.parse("exp:2e-3"), Decay.parse("linear:0.25")
    assert exp.alpha(0) == 1.0 and exp.alpha(500) == pytest.approx(math.exp(-1.0))
    assert [lin.alpha(t) for t in (0, 1, 2, 3, 4, 5, 100)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    auto = Decay.parse("exp:auto").resolved(1000)
    assert auto.alpha(1000) == pytest.approx(1e-3)
    assert Decay.parse("linear:auto").resolved(40).alpha(40) == 0.0
    for bad in ("exp", "cubic:1e-3", "exp:-1", "linear:abc"):
        with pytest.raises(ValueError):
            Decay.parse(bad)


def test_phase_boundaries_and_mdgf_decay_start_at_the_sparse_phase():
    target = Pattern(1, 8)
    r = Recipe("mdgf", target, total_steps=100, dense_fraction=0.2, sparse_fraction=0.5, decay=Decay("linear", 0.02))
    assert r.bounds == (20, 70)
    assert r.state(19).phase == "dense" and r.state(19).pattern is None
    first = r.state(20)
    assert first.phase == "sparse" and first.alpha == 1.0 and first.pattern == target  # decay starts here, not at 0
    assert r.state(45).alpha == pytest.approx(0.5)
    assert r.state(69).alpha == pytest.approx(1 - 0.02 * 49)
    assert r.state(70) == r.state(99)
    assert r.state(70).phase == "finetune" and r.state(70).alpha == 0.0


def test_srste_is_the_hard_target_mask_with_lambda_from_the_first_sparse_step():
    r = Recipe("srste", Pattern(2, 4), total_steps=10, sparse_fraction=0.6, lam=2e-4)
    assert all(r.state(t).pattern == Pattern(2, 4) and r.state(t).alpha == 0.0 and r.state(t).lam == 2e-4 for t in range(10))


def test_sdgf_steps_through_the_schedule_in_equal_segments():
    schedule = tuple(parse_schedule("7:8,4:8,2:8,1:8", Pattern(1, 8)))
    r = Recipe("sdgf", Pattern(1, 8), total_steps=100, dense_fraction=0.1, sparse_fraction=0.8, schedule=schedule)
    seen = [str(r.state(t).pattern) for t in range(10, 90)]
    assert seen == ["7:8"] * 20 + ["4:8"] * 20 + ["2:8"] * 20 + ["1:8"] * 20
    assert r.state(9).pattern is None and r.state(90).pattern == Pattern(1, 8)
    constant = parse_schedule("8:64,4:32,2:16,1:8", Pattern(1, 8))
    assert {p.density for p in constant} == {0.125}
    assert [str(p) for p in default_schedule(Pattern(1, 8))] == ["7:8", "4:8", "2:8", "1:8"]
    assert [str(p) for p in default_schedule(Pattern(2, 4))] == ["3:4", "2:4"]
    with pytest.raises(ValueError, match="must end at the target"):
        parse_schedule("4:8,2:8", Pattern(1, 8))
    with pytest.raises(ValueError, match="denser"):
        parse_schedule("2:8,4:8,1:8", Pattern(1, 8))


def test_pattern_parsing():
    assert Pattern.parse(" 2 : 4") == Pattern(2, 4) and Pattern(1, 8).density == 0.125
    for bad in ("4:4", "0:4", "2-4", "a:b"):
        with pytest.raises(ValueError):
            Pattern.parse(bad)


# --------------------------------------------------------------------------- grouping and gradients
def brute_conv_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """For each output channel and kernel position, top-n |w| in every run of m input channels."""
    out = torch.zeros_like(w, dtype=torch.bool)
    for o in range(w.shape[0]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                for c0 in range(0, w.shape[1], m):
                    vals = w[o, c0:c0 + m, i, j].abs()
                    order = sorted(range(m), key=lambda k: (-float(vals[k]), k))[:n]
                    for k in order:
                        out[o, c0 + k, i, j] = True
    return out


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 3, bias=True)
    sparse = NMSparse(conv, "reference")
    set_state({"c": sparse}, Recipe("srste", Pattern(2, 4), 1).state(0))
    x = torch.randn(2, 8, 5, 5)
    mask = brute_conv_mask(conv.weight.detach(), 2, 4)
    torch.testing.assert_close(sparse(x), nn.functional.conv2d(x, conv.weight * mask, conv.bias))
    w = conv.weight.detach()
    assert torch.equal(from_reduction_view(reduction_view(w), w.shape), w)


@pytest.mark.parametrize("recipe,alpha,lam", [("srste", 0.0, 2e-4), ("mdgf", 0.3, 0.0), ("sdgf", 0.0, 0.0)])
def test_sparse_layer_gradients_match_autograd_on_the_reference_formula(recipe, alpha, lam):
    from deploypipe.stages.sparsify.schedules import SparseState

    torch.manual_seed(1)
    for layer in (nn.Linear(16, 5).double(), nn.Conv2d(8, 4, 3).double()):
        x = torch.randn(3, 16, dtype=torch.float64) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5, dtype=torch.float64)
        sparse = NMSparse(layer, "reference")
        sparse.sparse_state = SparseState("sparse", Pattern(1, 4), alpha, lam)
        sparse(x).pow(2).sum().backward()
        ours_w, ours_b = layer.weight.grad.clone(), layer.bias.grad.clone()

        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        mask = (brute_conv_mask(w.detach(), 1, 4) if w.dim() == 4 else
                brute_conv_mask(w.detach()[:, :, None, None], 1, 4)[:, :, 0, 0]).double()
        w_eff = w + (w * (mask + (1 - mask) * alpha) - w).detach()  # straight-through
        out = nn.functional.linear(x, w_eff, b) if w.dim() == 2 else nn.functional.conv2d(x, w_eff, b)
        (out.pow(2).sum() + lam / 2 * ((1 - mask) * w).pow(2).sum()).backward()
        torch.testing.assert_close(ours_w, w.grad)
        torch.testing.assert_close(ours_b, b.grad)  # the bias is kept and trained


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 12, 1), nn.Flatten(), nn.Linear(12 * 16, 24), nn.ReLU(), nn.Linear(24, 5))


def test_layer_selection_skips_first_last_and_indivisible_layers():
    chosen, skipped = select_sparse_layers(_model(), {8})
    assert chosen == ["2", "4", "6"]
    reasons = {r["layer"]: r["reason"] for r in skipped}
    assert "first or last" in reasons["0"] and "first or last" in reasons["8"]
    chosen, skipped = select_sparse_layers(_model(), {16})
    assert chosen == ["4", "6"] and "multiple of M=16" in {r["layer"]: r["reason"] for r in skipped}["2"]


def test_harden_gives_an_exact_pattern_and_the_checker_rejects_a_broken_one():
    model = _model()
    names, _ = select_sparse_layers(model, {4})
    harden(model, wrap_sparse(model, names), Pattern(2, 4))
    assert all(isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear)) for n in names)
    rows = check_model(model, {n: Pattern(2, 4) for n in names})
    assert all(r["ok"] and r["sparsity"] == 0.5 for r in rows)
    assert not any(r["ok"] for r in check_model(model, {n: Pattern(1, 4) for n in names}))
    with torch.no_grad():
        w = model.get_submodule("4").weight
        zero = (w[0, :4, 0, 0] == 0).nonzero()[0, 0]
        w[0, zero, 0, 0] = 0.1  # one group now has three non-zeros
    rows = {r["layer"]: r for r in check_model(model, {n: Pattern(2, 4) for n in names})}
    assert not rows["4"]["ok"] and rows["4"]["violating_groups"] == 1 and rows["2"]["ok"]
    assert violating_groups(torch.tensor([[1.0, 0, 0, 2, 3, 0, 0, 0]]), Pattern(1, 4)) == (1, 2)


def test_checker_reads_onnx_weights(tmp_path):
    model = _model().eval()
    names, _ = select_sparse_layers(model, {4})
    harden(model, wrap_sparse(model, names), Pattern(2, 4))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 4, 4),), str(path), opset_version=17, dynamo=False)
    rows = check_onnx(path, Pattern(2, 4))
    assert len(rows) == 3 and all(r["ok"] for r in rows)
    assert not all(r["ok"] for r in check_onnx(path, Pattern(2, 4), keep_first_last=False))  # the dense last Linear


def test_quantize_keeps_the_pattern_through_adaquant():
    from deploypipe.stages.quantize.calibrate import adaquant_model, init_ranges
    from deploypipe.stages.quantize.adaquant import AdaQuantSettings
    from deploypipe.stages.quantize.modules import wrap_layers

    model = _model().eval()
    names, _ = select_sparse_layers(model, {4})
    harden(model, wrap_sparse(model, names), Pattern(2, 4))
    plan = {n: {"w_bits": 4, "a_bits": 8, **({"sparse": "2:4"} if n in names else {})} for n in ["0", "2", "4", "6", "8"]}
    import copy
    q = wrap_layers(copy.deepcopy(model), plan).eval()
    x = torch.rand(64, 3, 4, 4)

    def batches():
        return iter([x[:32], x[32:]])

    init_ranges(model, q, list(plan), batches, "mse", "mse")
    adaquant_model(model, q, list(plan), batches, "sequential", AdaQuantSettings(iters=30, batch_size=16, lr_weight=1e-2), 1 << 26, 0, False)
    rows = check_model(q, {n: Pattern(2, 4) for n in names})
    assert all(r["ok"] for r in rows), rows
    assert any(not r["ok"] for r in check_model(q, {"8": Pattern(2, 4)}))  # the dense last layer is not 2:4
    fc = q.get_submodule("6")  # stored compressed: 2 x (4 value bits + 2 position bits) per 4 weights, + scales
    assert fc.weight_storage_bits() == 3 * fc.layer.weight.numel() + 32 * fc.layer.out_features
    assert q.get_submodule("8").weight_storage_bits() == 4 * 24 * 5 + 32 * 5


def test_attention_out_projection_is_left_alone_and_a_transformer_layer_trains_sparse():
    from deploypipe.stages.sparsify.patterns import sparsifiable_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                          nn.Linear(16, 3))
    names = [n for n, _ in sparsifiable_layers(model)]
    assert "1.self_attn.out_proj" not in names and {"1.linear1", "1.linear2"} <= set(names)
    chosen, _ = select_sparse_layers(model, {4})
    wrapped = wrap_sparse(model, chosen)
    set_state(wrapped, Recipe("srste", Pattern(2, 4), 1, lam=2e-4).state(0))
    model(torch.randn(2, 5, 8)).sum().backward()  # MHA reads out_proj.weight directly: it must stay an nn.Linear
    harden(model, wrapped, Pattern(2, 4))
    assert all(r["ok"] for r in check_model(model, {n: Pattern(2, 4) for n in chosen}))


def test_limits_of_patterns_decays_and_the_checker():
    with pytest.raises(ValueError, match="above 128"):
        Pattern.parse("1:256")
    with pytest.raises(ValueError):
        Decay.parse("exp:1e400")
    model = _model()
    with pytest.raises(ValueError, match="not a multiple of M=16"):
        check_model(model, {"2": Pattern(1, 16)})  # 8 input channels


def test_onnx_checker_groups_conv_weights_by_input_channels(tmp_path):
    patchify = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2)).eval()
    path = tmp_path / "p.onnx"
    torch.onnx.export(patchify, (torch.rand(1, 3, 4, 4),), str(path), opset_version=17, dynamo=False)
    # the 4x4 patch conv has 48 weights per row (a multiple of 4) but only 3 input channels: not eligible
    names = [r["layer"] for r in check_onnx(path, Pattern(2, 4), keep_first_last=False)]
    assert len(names) == 2 and not any("0" == n.split(".")[0] for n in names)

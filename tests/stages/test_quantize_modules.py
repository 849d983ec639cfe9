"""Quantized layers against a hand-composed reference, exact batch-norm folding, zeros staying
zero (N:M sparsity survives), and the transform record reloading the quantized model exactly."""

import torch
from torch import nn

from deploypipe.models import ModelRecord, build_model, load_model, save_model
from deploypipe.stages.quantize.modules import (TRANSFORM_MODULE, QuantLayer, conv_bn_pairs, fold_batchnorm,
                                                quantizable_layers, select_layers, wrap_layers)
from deploypipe.stages.quantize.quantizer import fake_quant, minmax_scale
from deploypipe.zoo import resnet20, vit_tiny


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_unquantized_wrapper_is_the_layer():
    conv, lin = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(12, 5)
    x, v = torch.randn(2, 3, 9, 9), torch.randn(4, 12)
    torch.testing.assert_close(QuantLayer(conv, None, None)(x), conv(x))
    torch.testing.assert_close(QuantLayer(lin, None, None)(v), lin(v))


def test_quant_layer_equals_hand_composition():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = QuantLayer(conv, w_bits=4, a_bits=8)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        q.act_scale.fill_(x.abs().max() / 127)
    ws = minmax_scale(conv.weight, 4, axis=0)
    step = q.act_scale * ws  # the bias sits on the int32 accumulator grid s_x * s_w of each channel
    bias = torch.round(conv.bias / step) * step
    ref = torch.nn.functional.conv2d(fake_quant(x, q.act_scale, 8), fake_quant(conv.weight, ws, 4, axis=0),
                                     bias, padding=1)
    torch.testing.assert_close(q(x), ref)
    assert not torch.equal(bias, conv.bias)  # (the rounding is visible at this scale)
    levels = [len(torch.unique(q.quantized_weight()[c])) for c in range(6)]
    assert max(levels) <= 15  # 4-bit symmetric: at most 15 values per output channel


def test_zeros_stay_zero_so_nm_sparsity_survives():
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        w = lin.weight.view(8, 4, 4)
        keep = w.abs().topk(2, dim=2).indices
        mask = torch.zeros_like(w).scatter_(2, keep, 1.0)
        lin.weight.copy_((w * mask).view(8, 16))  # 2:4 sparse rows
    q = QuantLayer(lin, w_bits=3, a_bits=None).quantized_weight()
    assert torch.equal(q == 0, (lin.weight == 0) | (q == 0))
    assert ((q.view(8, 4, 4) != 0).sum(2) <= 2).all()


def test_batchnorm_folding_is_exact():
    model = randomize_bn(resnet20())
    x = torch.rand(4, 3, 32, 32)
    before = model(x)
    pairs = fold_batchnorm(model)
    assert len(pairs) == 19  # every conv of ResNet-20 has its BN; fc has none
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_layer_discovery_and_selection():
    names = [n for n, _ in quantizable_layers(vit_tiny())]
    assert names[0] == "patch_embed" and names[-1] == "head" and len(names) == 1 + 6 * 4 + 1
    assert select_layers(names, exclude=["patch_embed", "head"]) == names[1:-1]
    assert select_layers(names, include=["blocks.0.*"]) == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                             "blocks.0.fc1", "blocks.0.fc2"]


def test_transform_record_reloads_the_quantized_model(tmp_path):
    record = ModelRecord("zoo:resnet20", {"num_classes": 10}, input_shape=[3, 32, 32], num_classes=10)
    model = randomize_bn(build_model(record))
    folded = fold_batchnorm(model)
    names = [n for n, _ in quantizable_layers(model)]
    plan = {n: {"w_bits": 8 if n in (names[0], names[-1]) else 4, "a_bits": 8, "a_signed": True} for n in names}
    wrap_layers(model, plan)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():  # non-default scales, as calibration would leave them
        for m in model.modules():
            if isinstance(m, QuantLayer):
                m.act_scale.fill_(0.05)
                m.weight_scale.mul_(0.9)
    save_model(model, record.with_transform("quantize", TRANSFORM_MODULE, {"folded": folded, "layers": plan}),
               tmp_path / "q")
    again = load_model(tmp_path / "q")
    assert sum(isinstance(m, QuantLayer) for m in again.modules()) == 20
    assert torch.equal(again(x), model.eval()(x))


def test_models_fx_cannot_trace_are_left_unfolded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(self.conv(x))
            return self.conv(x)

    assert conv_bn_pairs(Branchy()) == []


def test_bn_folding_in_float64_with_tiny_variances_and_a_conv_bias():
    """The folded conv equals conv + BN (eval) to float64 precision, for running variances down to 1e-6
    (where BN's eps of 1e-5 dominates: dropping it changes the output by orders of magnitude) and a conv
    that already has a bias."""
    import torch
    from torch import nn

    from deploypipe.stages.quantize.modules import fold_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), nn.ReLU()).double().eval()
    bn = model[1]
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-6, 1e-5, 1e-3, 0.1, 1.0, 4.0], dtype=torch.float64))
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
        model[0].bias.uniform_(-0.3, 0.3)
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    want = model(x)
    folded = fold_batchnorm(model)
    assert folded == [["0", "1"]] and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)

"""BN re-estimation restores, on the calibration set, exactly the per-channel output statistics
(mean beta, std |gamma|) computed by hand, without changing any integer code; bias tuning lowers
the KL to the FP logits."""

import copy

import pytest

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.stages.quantize.calibrate import init_ranges
from deploypipe.stages.quantize.mixed_precision import calibration_kl
from deploypipe.stages.quantize.modules import QuantLayer, conv_bn_pairs, fold_batchnorm, quantizable_layers, wrap_layers
from deploypipe.stages.quantize.quantizer import quantize_codes
from deploypipe.stages.quantize.tuning import bn_affine, guarded_reestimate_bn, reestimate_bn, tune_biases
from deploypipe.zoo import digits_cnn


def quantized_digits_cnn(w_bits=3, a_bits=4):
    torch.manual_seed(0)
    fp = digits_cnn().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight[::3] *= -1  # some negative gammas
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    affine = bn_affine(fp, [list(p) for p in conv_bn_pairs(fp)])
    fold_batchnorm(fp)
    names = [n for n, _ in quantizable_layers(fp)]
    q = wrap_layers(copy.deepcopy(fp), {n: {"w_bits": w_bits, "a_bits": a_bits} for n in names}).eval()
    x = torch.rand(300, 1, 8, 8, generator=g)

    def batches():
        return (x[i:i + 64] for i in range(0, 300, 64))

    init_ranges(fp, q, names, batches, "minmax", "minmax")
    return fp, q, affine, x, batches


def _stats_by_hand(model, name, x):
    outs = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        model(x)  # one pass over all images
    h.remove()
    o = torch.cat(outs).double()
    return o.mean((0, 2, 3)), o.std((0, 2, 3), unbiased=False)


@pytest.mark.parametrize("target", ["bn", "fp"])
def test_bn_reestimation_matches_hand_computed_statistics(target):
    fp, q, affine, x, batches = quantized_digits_cnn()
    codes = {n: quantize_codes(m.layer.weight, m.weight_scale, m.w_bits, axis=0)
             for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    reestimate_bn(q, affine, batches, fp if target == "fp" else None)
    for name, (gamma, beta) in affine.items():
        mean, std = _stats_by_hand(q, name, x)
        want_mean, want_std = (beta.double(), gamma.abs().double()) if target == "bn" else _stats_by_hand(fp, name, x)
        layer = q.get_submodule(name)
        # the bias lands on the int32 accumulator grid s_x * s_w: the mean is exact up to half a step
        step = (layer.act_scale * layer.weight_scale).double().detach()
        assert_within(mean, want_mean, (step / 2 if layer.integer else 0) + 1e-4)
        torch.testing.assert_close(std, want_std, atol=1e-4, rtol=1e-4)
    for n, m in q.named_modules():  # the integer codes are untouched: the factor went into the scale
        if isinstance(m, QuantLayer):
            assert torch.equal(quantize_codes(m.layer.weight, m.weight_scale, m.w_bits, axis=0), codes[n])


def assert_within(got, want, tol):
    assert bool(((got - want).abs() <= tol).all()), (got - want).abs().max()


def test_bn_reestimation_with_the_fp_target_leaves_an_unquantized_model_unchanged():
    fp, q, affine, x, batches = quantized_digits_cnn()
    same = copy.deepcopy(fp)
    with torch.no_grad():
        before = same(x)
    wrapped = wrap_layers(same, {n: {"w_bits": None, "a_bits": None} for n in affine})
    reestimate_bn(wrapped, affine, batches, fp)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), before, atol=1e-4, rtol=1e-4)


def test_guarded_bn_reestimation_is_undone_exactly_when_it_raises_the_calibration_kl():
    fp, q, affine, x, batches = quantized_digits_cnn()
    with torch.no_grad():
        before = q(x)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    wrong = {n: (3 * g, b + 1) for n, (g, b) in affine.items()}  # a target far from the FP statistics
    _, bn = guarded_reestimate_bn(q, fp, wrong, batches, target="bn")
    assert bn["bn_kept"] == 0.0 and bn["bn_kl_after"] > bn["bn_kl_before"]
    assert bn["bn_kl_before"] == pytest.approx(calibration_kl(fp, q, batches))
    assert q.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    with torch.no_grad():
        assert torch.equal(q(x), before)
    # without the guard the same correction stays
    _, bn = guarded_reestimate_bn(q, fp, wrong, batches, target="bn", guard=False)
    assert bn["bn_kept"] == 1.0 and calibration_kl(fp, q, batches) == pytest.approx(bn["bn_kl_after"])


def test_guarded_bn_reestimation_keeps_a_correction_that_lowers_the_kl():
    fp, q, affine, x, batches = quantized_digits_cnn(w_bits=2, a_bits=8)
    _, bn = guarded_reestimate_bn(q, fp, affine, batches, target="fp")
    assert bn["bn_kl_after"] < bn["bn_kl_before"] and bn["bn_kept"] == 1.0
    assert calibration_kl(fp, q, batches) == pytest.approx(bn["bn_kl_after"])


def test_bias_tuning_lowers_the_kl_to_fp_logits():
    fp, q, _, x, batches = quantized_digits_cnn(w_bits=2, a_bits=3)
    weights = {n: p.detach().clone() for n, p in q.named_parameters() if not n.endswith("bias")}
    before, after = tune_biases(fp, q, batches, steps=200, lr=1e-2)
    assert after < 0.9 * before
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(q(x), 1), F.log_softmax(fp(x), 1), log_target=True, reduction="batchmean")
    assert abs(kl.item() - after) < 1e-4 * max(1.0, after) + 1e-6
    assert all(torch.equal(p, weights[n]) for n, p in q.named_parameters() if n in weights)  # only biases moved


def test_noisy_calibration_batches_repeat_exactly_and_have_the_asked_noise():
    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.stages.quantize.config import QuantizeConfig
    from deploypipe.stages.quantize.ptq import calibration_batches

    data = load_data(DataSpec(source="digits", calib_size=512))
    calib = [x for x, _ in data.calib.batches(100)]

    def batches(sigma, size=100):
        cfg = QuantizeConfig(calib_noise_sigma=sigma, calib_batch_size=size)
        return list(calibration_batches(torch.cat(calib), cfg, 3, torch.device("cpu"))())

    clean = torch.cat(batches(0.0))
    assert torch.equal(clean, torch.cat(calib))
    first, second = batches(0.25), batches(0.25)
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # every AdaQuant pass sees the same images
    noise = torch.cat(first) - clean
    assert noise.std().item() == pytest.approx(0.25, rel=0.02) and abs(noise.mean().item()) < 0.01
    assert not torch.equal(first[0] - clean[:100], first[1] - clean[100:200])  # fresh noise per image
    assert torch.equal(torch.cat(batches(0.25, size=64)), torch.cat(first))  # whatever the batch size

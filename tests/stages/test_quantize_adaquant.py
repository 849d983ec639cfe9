"""AdaQuant lowers each layer's output MSE below round-to-nearest (fixed seed), for convs and
linears, with and without a following ReLU, at 4 and 3 bits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.stages.quantize.adaquant import AdaQuantSettings, adaquant_layer
from deploypipe.stages.quantize.modules import QuantLayer
from deploypipe.stages.quantize.quantizer import mse_scale


@pytest.mark.parametrize("kind, relu, w_bits, a_bits", [
    ("conv", True, 4, 4), ("conv", False, 3, 8), ("linear", True, 4, 8), ("linear", False, 3, 4)])
def test_adaquant_beats_round_to_nearest(kind, relu, w_bits, a_bits):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # correlated inputs, as real features are: smooth feature maps after a conv and ReLU; low-rank vectors
    if kind == "conv":
        layer = nn.Conv2d(8, 16, 3, padding=1)
        smooth = F.avg_pool2d(torch.randn(256, 3, 10, 10, generator=g), 3, stride=1)
        x = F.relu(F.conv2d(smooth, torch.randn(8, 3, 1, 1, generator=g)))
    else:
        layer = nn.Linear(32, 24)
        x = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(512, 32, generator=g)
    with torch.no_grad():
        y = layer(x)
        y = F.relu(y) if relu else y
    q = QuantLayer(layer, w_bits, a_bits, a_signed=kind != "conv")
    with torch.no_grad():
        q.act_scale.copy_(mse_scale(x, a_bits, signed=kind != "conv"))
        q.weight_scale.copy_(mse_scale(layer.weight, w_bits, axis=0))
    w_before = layer.weight.detach().clone()
    res = adaquant_layer(q, x, y, relu=relu, settings=AdaQuantSettings(iters=400, batch_size=50, lr_weight=1e-4),
                         generator=torch.Generator().manual_seed(1))
    assert res.mse_adaquant < 0.9 * res.mse_rtn, (res.mse_rtn, res.mse_adaquant)
    assert not torch.equal(layer.weight, w_before)  # the weights moved (not rounding-only)
    with torch.no_grad():  # the reported MSE is the layer's MSE now
        out = q(x)
        out = F.relu(out) if relu else out
        assert F.mse_loss(out, y).item() == pytest.approx(res.mse_adaquant, rel=1e-4)


def test_a_layer_is_never_left_worse_than_round_to_nearest():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(128, 16)
    y = layer(x).detach()
    q = QuantLayer(layer, 4, None)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    res = adaquant_layer(q, x, y, settings=AdaQuantSettings(iters=20, lr_weight=10.0, lr_bias=10.0))  # absurd steps
    assert res.mse_adaquant <= res.mse_rtn
    if res.mse_adaquant == res.mse_rtn:
        assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())


def test_capture_stops_each_pass_at_the_layer_and_keeps_every_call_of_a_shared_one():
    from deploypipe.stages.quantize.calibrate import capture

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), Counter()).eval()
    data = [torch.randn(5, 4) for _ in range(3)]
    x, y = capture(net, "2", lambda: iter(data))
    with torch.no_grad():
        hidden = [net[1](net[0](b)) for b in data]
        assert torch.equal(x, torch.cat(hidden)) and torch.equal(y, net[2](torch.cat(hidden)))
    assert net[3].calls == 1  # only the first pass ran past the layer

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    shared = Shared().eval()
    xs, _ = capture(shared, "lin", lambda: iter(data))
    assert len(xs) == 2 * 15  # both calls of every pass

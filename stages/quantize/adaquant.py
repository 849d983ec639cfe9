"""AdaQuant for one layer (Hubara et al. 2021, eq. 2): with cached inputs X and full-precision
outputs Y, minimise

    || f(Q_a(X); Q_w(W + dW), b + db) - Y ||^2      (after the following ReLU, when there is one)

over the weights, the bias, the per-channel weight scales and the activation scale, with Adam on
random mini-batches of the cached samples. The weights move freely and are re-rounded through the
straight-through estimator every step (not AdaRound's rounding-only search).

Scales are learned as multipliers of their initial (calibrated) values, so a scale learning rate
means the same relative step whatever the magnitude of the layer's weights or inputs. Learning rates
follow a cosine decay to zero over the iterations (with a constant rate the straight-through
updates keep flipping weights across rounding boundaries and the loss wanders); the best state seen
on a fixed subset of the cache is kept, and a layer that ends no better than round-to-nearest keeps
its round-to-nearest state.

Schedule: 250 steps at 4x the paper's learning rates (the same rate x steps product as its 1,000
steps; on a CIFAR-10 ResNet-20 at W4A8 it reaches the same layer MSE, bench/quantize.py puts the two
side by side), checked on the probe subset every tenth of the steps; ``patience`` checks without a
better probe MSE end a layer early.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .modules import QuantLayer


@dataclass
class AdaQuantSettings:
    iters: int = 250
    batch_size: int = 50       # cached samples per step (the paper's value)
    lr_weight: float = 4e-5    # 4x the paper's reference rates (1e-5, 1e-3) over a quarter of its 1,000 steps
    lr_bias: float = 4e-3
    lr_weight_scale: float = 4e-3  # relative (scales are learned as multipliers)
    lr_act_scale: float = 4e-2     # relative
    patience: int = 3          # stop after this many probe checks (every iters/10 steps) without a better MSE; 0: never


@dataclass
class LayerResult:
    mse_rtn: float       # round-to-nearest with the calibrated scales
    mse_adaquant: float  # after optimisation (== mse_rtn when it did not help and was reverted)
    seconds: float
    steps: int = 0       # optimisation steps taken (fewer than iters after an early stop)


def _mse(q: QuantLayer, x: torch.Tensor, y: torch.Tensor, relu: bool, batch: int = 256) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = q(x[i:i + batch])
            out = F.relu(out) if relu else out
            total += F.mse_loss(out, y[i:i + batch], reduction="sum").item()
            n += out.numel()
    return total / max(n, 1)


def adaquant_layer(q: QuantLayer, x: torch.Tensor, y: torch.Tensor, relu: bool = False,
                   settings: Optional[AdaQuantSettings] = None,
                   generator: Optional[torch.Generator] = None) -> LayerResult:
    """Optimise one quantized layer in place towards the FP outputs ``y`` of inputs ``x``.

    ``y`` must already have the ReLU applied when ``relu`` is true."""
    s = settings or AdaQuantSettings()
    t0 = time.perf_counter()
    mse_rtn = _mse(q, x, y, relu)
    layer = q.layer
    saved = {k: v.detach().clone() for k, v in q.state_dict().items()}
    ws0, as0 = q.weight_scale.detach().clone(), q.act_scale.detach().clone()
    w_mult = torch.ones_like(ws0, requires_grad=True)
    a_mult = torch.ones_like(as0, requires_grad=True)
    groups = [{"params": [layer.weight], "lr": s.lr_weight},
              {"params": [w_mult], "lr": s.lr_weight_scale},
              {"params": [a_mult], "lr": s.lr_act_scale}]
    if layer.bias is not None:
        groups.append({"params": [layer.bias], "lr": s.lr_bias})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / s.iters)))
    n = len(x)
    probe = torch.randperm(n, generator=generator)[:min(n, 512)]  # fixed subset to pick the best state
    check_every = max(1, s.iters // 10)

    def apply_scales() -> None:
        with torch.no_grad():
            q.weight_scale.copy_(ws0 * w_mult)
            q.act_scale.copy_(as0 * a_mult)

    best_mse, best_state = _mse(q, x[probe], y[probe], relu), saved
    stale = 0  # probe checks since the best one
    with torch.enable_grad():
        it = 0
        for it in range(1, s.iters + 1):
            idx = torch.randint(0, n, (min(s.batch_size, n),), generator=generator)
            out = q.forward_with(x[idx], layer.weight, layer.bias, ws0 * w_mult, as0 * a_mult)
            loss = F.mse_loss(F.relu(out) if relu else out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                w_mult.clamp_(min=1e-3)
                a_mult.clamp_(min=1e-3)
            if it % check_every == 0 or it == s.iters:
                apply_scales()
                mse = _mse(q, x[probe], y[probe], relu)
                if mse < best_mse:
                    best_mse, best_state = mse, {k: v.detach().clone() for k, v in q.state_dict().items()}
                    stale = 0
                else:
                    stale += 1
                    if s.patience and stale >= s.patience:
                        break
    q.load_state_dict(best_state)
    mse_after = _mse(q, x, y, relu)
    if not mse_after < mse_rtn:  # never worse than round-to-nearest
        q.load_state_dict(saved)
        mse_after = mse_rtn
    return LayerResult(mse_rtn, mse_after, time.perf_counter() - t0, it)

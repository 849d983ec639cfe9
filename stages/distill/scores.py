"""Data-pruning scores, one per training example (higher = harder to learn).

- ``el2n`` (Paul et al. 2021): the L2 norm of the error vector, ||softmax(f(x)) - onehot(y)||_2, of
  models trained briefly (a fraction of the epochs), averaged over several seeds.
- ``grand`` (Paul et al. 2021): the norm of the loss gradient with respect to *all* parameters,
  ||grad_theta CE(f(x), y)||_2, per example (torch.func: vmap over per-example grads), averaged
  over the same models.
- ``grand-last``: the last-layer approximation a popular library uses instead: for a final Linear
  layer with input h, the gradient of CE with respect to its weight and bias is (p - y) h^T and
  (p - y), whose norm is ||p - y|| * sqrt(||h||^2 + 1). Labelled as an approximation.
- ``forgetting`` (Toneva et al. 2019): over one training run, each time an example is presented its
  prediction is right or wrong; a forgetting event is a right -> wrong transition between two
  consecutive presentations. Examples never learned (never right) count as forgotten more often
  than any example can be (one more than the number of presentations), so they rank hardest — a
  popular library ranks them easiest.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.training import Callback, TrainBatch

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def el2n(models: list[nn.Module], batches: Callable[[], Batches], device: torch.device | str = "cpu") -> torch.Tensor:
    """EL2N score of every example (in the order of ``batches()``), averaged over ``models``."""
    total = None
    for model in models:
        model.eval()
        scores = []
        for x, y in batches():
            p = F.softmax(model(x.to(device)).float(), 1)
            scores.append((p - F.one_hot(y.to(device), p.shape[1]).float()).norm(dim=1).cpu())
        s = torch.cat(scores)
        total = s if total is None else total + s
    return total / len(models)


def grand(models: list[nn.Module], batches: Callable[[], Batches], device: torch.device | str = "cpu",
          chunk: int = 64) -> torch.Tensor:
    """GraNd: the full-parameter per-example gradient norm, averaged over ``models``. BatchNorm
    layers use their running statistics (eval mode), so each example's gradient is its own."""
    from torch.func import functional_call, grad, vmap

    total = None
    for model in models:
        model.eval()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p, x, y):
            out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        scores = []
        for x, y in batches():
            for xs, ys in zip(x.split(chunk), y.split(chunk)):
                grads = per_example(params, xs.to(device), ys.to(device))
                scores.append(torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())).cpu())
        s = torch.cat(scores)
        total = s if total is None else total + s
    return total / len(models)


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("grand-last needs a model whose last layer is an nn.Linear — fix: use score grand (the "
                         "full-parameter gradient norm)")
    return linears[-1]


@torch.no_grad()
def grand_last_layer(models: list[nn.Module], batches: Callable[[], Batches],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The last-layer approximation of GraNd: ||p - y|| * sqrt(||h||^2 + 1), h the final Linear's input."""
    total = None
    for model in models:
        model.eval()
        layer, seen = last_linear(model), {}
        handle = layer.register_forward_hook(lambda _m, i, _o: seen.__setitem__("h", i[0].detach()))
        scores = []
        try:
            for x, y in batches():
                p = F.softmax(model(x.to(device)).float(), 1)
                err = (p - F.one_hot(y.to(device), p.shape[1]).float()).norm(dim=1)
                h = seen["h"].flatten(1).float()
                scores.append((err * torch.sqrt(h.pow(2).sum(1) + 1)).cpu())
        finally:
            handle.remove()
        s = torch.cat(scores)
        total = s if total is None else total + s
    return total / len(models)


def forgetting_counts(correct: list[list[bool]]) -> torch.Tensor:
    """Forgetting events per example from its presentations in order (``correct[i]``: was example i
    predicted right at each of its presentations); a never-learned example gets one more than the
    most presentations any example had."""
    most = max((len(c) for c in correct), default=0)
    counts = []
    for history in correct:
        if not any(history):
            counts.append(most + 1)
            continue
        counts.append(sum(1 for a, b in zip(history, history[1:]) if a and not b))
    return torch.tensor(counts, dtype=torch.float64)


class ForgettingTracker(Callback):
    """Records, during training, whether each presented example (by its index in the training set) was
    predicted right; ``counts()`` turns that into forgetting scores."""

    def __init__(self, size: int):
        self.history: list[list[bool]] = [[] for _ in range(size)]

    def loss(self, logits: torch.Tensor, batch: TrainBatch):
        if batch.ids is not None and batch.y is not None:
            right = (logits[: len(batch.y)].argmax(1) == batch.y).tolist()
            for i, ok in zip(batch.ids.tolist(), right):
                self.history[i].append(bool(ok))
        return None  # the loss stays the default (cross-entropy)

    def counts(self) -> torch.Tensor:
        return forgetting_counts(self.history)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]

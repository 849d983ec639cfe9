"""N:M sparse training as one call: ``sparsify(model, train_data, config)``.

Selects the layers that can hold the pattern, wraps them (``NMSparse``), trains on the shared loop of
deploypipe.training with the recipe's per-step state (SR-STE, mask decay MDGF or structure decay SDGF:
schedules.py), hard-masks the layers at the end, checks every one holds its pattern, and compresses
them (kept values + bit-packed positions). The returned model has the input's architecture with
exact zeros where the pattern prunes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from deploypipe.data import Augment, ImageSet
from deploypipe.kernels.nm_compress import nm_compress, nm_decompress, pack_positions, packed_index_bits
from deploypipe.training import Callback, Evaluate, Trainer, TrainOptions

from .checker import check_model
from .config import SparsifyConfig
from .patterns import Pattern, from_reduction_view, reduction_view, select_sparse_layers
from .schedules import Recipe
from .sparse_layer import NMSparse, harden, set_state, wrap_sparse

Measure = Callable[[nn.Module], dict[str, float]]


@dataclass
class SparsifyReport:
    """What ``sparsify`` did: the sparse layers and their pattern, the layers kept dense and why, the
    per-layer check, per-epoch rows, the schedule over the steps, the compressed weights, figures."""

    layers: dict[str, str]
    kept_dense: list[dict]
    table: list[dict]
    history: list[dict]
    trace: list[dict]
    compressed: dict[str, dict]
    metrics: dict[str, float] = field(default_factory=dict)


class SparseSchedule(Callback):
    """Sets every sparse layer's state (pattern, alpha, lambda) for the optimizer step about to run,
    samples the schedule for the plot (about 200 points), and adds the phase to each epoch's row."""

    def __init__(self, recipe: Recipe, wrapped: dict[str, NMSparse], total: int):
        self.recipe, self.wrapped, self.total = recipe, wrapped, total
        self.trace: list[dict] = []
        self.last = 0

    def before_step(self, step: int) -> None:
        state = self.recipe.state(step)
        set_state(self.wrapped, state)
        if step % max(1, self.total // 200) == 0 or step == self.total - 1:
            self.trace.append({"step": step, "phase": state.phase, "alpha": state.alpha,
                               "density": 1.0 if state.pattern is None else state.pattern.density})
        self.last = step

    def end_of_epoch(self, epoch: int, model: nn.Module) -> dict[str, Any]:
        state = self.recipe.state(self.last)  # the evaluation below runs at this step's state
        return {"phase": state.phase, "alpha": state.alpha,
                "pattern": "dense" if state.pattern is None else str(state.pattern)}

    def state_dict(self) -> dict:
        return {"trace": self.trace, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.trace, self.last = state["trace"], state["last"]


def _reinitialise(model: nn.Module) -> None:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def compress_layers(model: nn.Module, names: list[str], pattern: Pattern) -> tuple[dict, dict[str, float]]:
    """{layer: {values, positions (bit-packed), shape, pattern}} and its size metrics; checked exact."""
    out, dense_bits, sparse_bits = {}, 0, 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach()
        matrix = reduction_view(w).contiguous()
        values, positions = nm_compress(matrix, pattern.n, pattern.m, "reference")
        if not torch.equal(from_reduction_view(nm_decompress(values, positions, pattern.n, pattern.m), w.shape), w):
            raise RuntimeError(f"compressing {name} at {pattern} is not exact: the layer is not {pattern}-sparse")
        out[name] = {"values": values.clone(), "positions": pack_positions(positions, pattern.m),
                     "count": positions.numel(), "shape": list(w.shape), "pattern": str(pattern),
                     "layout": "rows of the (out, kh*kw*in) reduction view; positions bit-packed, ceil(log2 M) bits"}
        dense_bits += 32 * w.numel()
        sparse_bits += packed_index_bits(pattern.n, pattern.m, 32) * w.numel()
    return out, {"sparse_layers_dense_bytes": dense_bits / 8, "sparse_layers_compressed_bytes": sparse_bits / 8,
                 "compressed_bits_per_weight_fp16": packed_index_bits(pattern.n, pattern.m, 16),
                 "compressed_bits_per_weight_fp32": packed_index_bits(pattern.n, pattern.m, 32)}


def sparsify(model: nn.Module, train_data: ImageSet | Iterable[Any], config: Optional[SparsifyConfig] = None, *,
             device: Optional[torch.device | str] = None, seed: int = 0, evaluate: Optional[Measure] = None,
             augment: Optional[Augment] = None, callbacks: Iterable[Callback] = (), checkpoint=None,
             show_progress: bool = False, log: Callable[[str], None] = lambda _msg: None
             ) -> tuple[nn.Module, SparsifyReport]:
    """Train ``model`` (in place) into ``config.pattern`` N:M sparsity; returns it and a report.

    ``train_data``: an ImageSet (shuffled and augmented by the loop, split over torchrun's ranks) or
    any sized iterable of ``(input, target)`` batches or dicts with a ``labels`` entry (a DataLoader).
    ``evaluate(model)``: figures to report — on the dense model (``dense_``), pruned without training
    (``oneshot_``), every ``eval_every`` epochs and at the end. ``callbacks``: more loop callbacks
    (e.g. logging each epoch).

    >>> import torch
    >>> from deploypipe import sparsify, SparsifyConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
    ...                           torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(4)]
    >>> net, report = sparsify(net, data, SparsifyConfig(pattern="2:4", epochs=2, lr=0.01))
    >>> report.layers
    {'2': '2:4'}
    >>> float((net[2].weight == 0).float().mean())
    0.5
    """
    cfg = config or SparsifyConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not isinstance(train_data, ImageSet) and not hasattr(train_data, "__len__"):
        train_data = list(train_data)  # the schedule needs the number of steps
    options = TrainOptions(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule_lr, warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing, channels_last=cfg.channels_last,
        augment=augment if cfg.augment else None, seed=seed, show_progress=show_progress, description="sparsify")
    trainer = Trainer(model, options, device, checkpoint=checkpoint)
    total = cfg.epochs * trainer.steps_per_epoch(train_data)
    recipe = cfg.recipe_for(total)
    target = recipe.target
    names, skipped = select_sparse_layers(model, recipe.group_sizes(), cfg.include, cfg.exclude, cfg.keep_first_last)
    for row in skipped:
        log(f"kept dense: {row['layer']} ({row['reason']})")
    if not names:
        raise ValueError(f"no layer can be made {target}-sparse (every layer is excluded, first/last, or has a "
                         f"reduction size that is not a multiple of M={max(recipe.group_sizes())}) — fix: choose a "
                         "pattern with a smaller M, or widen include")
    log(f"{len(names)} layers -> {target} with {cfg.recipe.upper()} (steps: dense {recipe.bounds[0]}, "
        f"sparse {recipe.bounds[1] - recipe.bounds[0]}, fine-tune {total - recipe.bounds[1]}"
        + (f"; decay {recipe.decay.resolved(recipe.bounds[1] - recipe.bounds[0])}" if cfg.recipe == "mdgf" else "")
        + (f"; schedule {' -> '.join(map(str, recipe.schedule))}" if cfg.recipe == "sdgf" else "") + ")")
    metrics: dict[str, float] = {}
    if evaluate is not None:
        metrics.update({f"dense_{k}": v for k, v in evaluate(model).items()})
        oneshot = copy.deepcopy(model)
        harden(oneshot, wrap_sparse(oneshot, names, "reference"), target)
        metrics.update({f"oneshot_{k}": v for k, v in evaluate(oneshot).items()})
        del oneshot
    if cfg.from_scratch:
        torch.manual_seed(seed)
        _reinitialise(model)

    wrapped = wrap_sparse(model, names, cfg.kernels)
    schedule = SparseSchedule(recipe, wrapped, total)
    trainer.callbacks = [schedule, *([Evaluate(evaluate, cfg.epochs, cfg.eval_every)] if evaluate else []),
                         *callbacks]
    t0 = time.perf_counter()
    history = trainer.fit(train_data)
    metrics["train_seconds"] = time.perf_counter() - t0 + trainer.resumed_seconds  # + an earlier sitting's epochs

    harden(model, wrapped, target)
    model.to(memory_format=torch.contiguous_format).eval()
    table = []
    for row in check_model(model, {n: target for n in names}):
        w = model.get_submodule(row["layer"]).weight
        table.append({**row, "params": w.numel(), "nonzero": int((w != 0).sum())})
    broken = [r["layer"] for r in table if not r["ok"]]
    if broken:  # the hard mask makes this impossible; a failure here is a bug, not bad input
        raise RuntimeError(f"layers {broken} do not hold {target} after hard masking")
    if evaluate is not None:
        metrics.update(evaluate(model))
    compressed, sizes = compress_layers(model, names, target)
    zeros = sum(r["params"] - r["nonzero"] for r in table)
    metrics.update(sizes)
    metrics.update({"sparse_layers": float(len(names)), "dense_layers": float(len(skipped)),
                    "sparse_layer_sparsity": zeros / sum(r["params"] for r in table),
                    "model_sparsity": zeros / sum(p.numel() for p in model.parameters())})
    report = SparsifyReport({n: str(target) for n in names}, skipped, table, history, schedule.trace, compressed,
                            metrics)
    return model, report

"""Data pruning with knowledge distillation as one call: ``distill(student, train, config, teacher=...)``.

1. Score every training example (scores.py: random, EL2N, GraNd, its last-layer approximation,
   forgetting events; or the user's own scores). EL2N and GraNd train ``score_seeds`` fresh copies
   of the student's architecture for ``score_epochs`` epochs; forgetting counts events over one run.
2. Keep a fraction of the examples (subset.py: a band of the ranking, class-balanced when asked or
   when a class would fall below a floor).
3. Train the student from scratch on the kept examples on the shared loop, with the KD loss of
   kd.py from the teacher (lambda fixed or grown as the kept fraction shrinks); lambda 0 is plain
   training, bit for bit.

Ben-Baruch et al. ("Distilling the Knowledge in Data Pruning") find that with KD a *random* subset
matches or beats the sophisticated scores at every kept fraction: ``random`` is the default.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from deploypipe.data import Augment, ImageSet
from deploypipe.noise import derive_seed
from deploypipe.training import Callback, Evaluate, Trainer, TrainOptions

from .config import DistillConfig
from .kd import KnowledgeDistillation, cache_logits
from .scores import ForgettingTracker, el2n, grand, grand_last_layer
from .subset import Selection, select

Measure = Callable[[nn.Module], dict[str, float]]


@dataclass
class DistillReport:
    """The scores (None for random), the kept set, the KD weight used, the student's per-epoch rows,
    a row per (kept fraction, KD or not) of a sweep, and the figures (scoring and training seconds)."""

    scores: Optional[torch.Tensor]
    selection: Selection
    kd_weight: float
    history: list[dict]
    sweep: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with fresh weights (every submodule's own reset), seeded."""
    torch.manual_seed(seed % 2**63)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def read_scores(path: str | Path, n: int) -> torch.Tensor:
    """User scores: a .npy vector, or a .csv whose ``score`` column lists one per example in order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"scores file '{path}' does not exist — fix: give a .npy or .csv file of one score per "
                         "training example")
    if path.suffix == ".npy":
        values = np.load(path).astype(np.float64).ravel()
    else:
        import csv

        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "score" not in rows[0]:
            raise ValueError(f"scores file '{path}' has no 'score' column — fix: write a CSV with a header "
                             "including score (e.g. index,score)")
        values = np.array([float(r["score"]) for r in rows])
    if len(values) != n:
        raise ValueError(f"scores file '{path}' holds {len(values)} scores for {n} training examples — fix: give "
                         "one score per training example, in the training set's order")
    return torch.from_numpy(values)


def _options(cfg: DistillConfig, epochs: int, seed: int, augment: Optional[Augment], show: bool,
             what: str) -> TrainOptions:
    return TrainOptions(epochs=epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                        label_smoothing=cfg.label_smoothing, channels_last=cfg.channels_last,
                        augment=augment if cfg.augment else None, seed=seed, show_progress=show, description=what)


def score_examples(student: nn.Module, train: Any, cfg: DistillConfig, device: torch.device, seed: int,
                   augment: Optional[Augment] = None, show_progress: bool = False,
                   log: Callable[[str], None] = lambda _m: None) -> Optional[torch.Tensor]:
    """One score per training example (higher = harder), or None for random selection. ``train``: an
    ImageSet or a ``LoaderData``."""
    if cfg.scores:
        return read_scores(cfg.scores, len(train))
    if cfg.score == "random":
        return None

    def batches():
        return train.batches(512)

    if cfg.score == "forgetting":
        epochs = cfg.forgetting_epochs or cfg.epochs
        tracker = ForgettingTracker(len(train))
        model = reinitialise(copy.deepcopy(student), derive_seed(seed, "forgetting"))
        log(f"forgetting: a {epochs}-epoch run on all {len(train)} examples")
        Trainer(model, _options(cfg, epochs, seed, augment, show_progress, "forgetting run"), device,
                [tracker]).fit(train)
        return tracker.counts()
    models = []
    for k in range(cfg.score_seeds):
        model = reinitialise(copy.deepcopy(student), derive_seed(seed, "score", k))
        log(f"{cfg.score}: scoring model {k + 1}/{cfg.score_seeds}, {cfg.score_epochs} epochs")
        Trainer(model, _options(cfg, cfg.score_epochs, derive_seed(seed, "score", k), augment, show_progress,
                                f"{cfg.score} model {k + 1}"), device).fit(getattr(train, "loader", train))
        models.append(model.eval())
    fn = {"el2n": el2n, "grand": grand, "grand-last": grand_last_layer}[cfg.score]
    return fn(models, batches, device).double()


def train_student(student: nn.Module, kept: Any, cfg: DistillConfig, teacher: Optional[nn.Module],
                  weight: float, device: torch.device, seed: int, augment: Optional[Augment],
                  evaluate: Optional[Measure], callbacks: Iterable[Callback], checkpoint: Optional[Path],
                  show_progress: bool) -> tuple[list[dict], float]:
    """Train ``student`` (in place, from its current weights) on ``kept`` with KD weight ``weight``.
    Returns the per-epoch history and the seconds of the epochs an earlier sitting ran (a resumed run
    reads them back from its checkpoint; 0 otherwise)."""
    hooks: list[Callback] = []
    if teacher is not None and weight > 0:
        cacheable = isinstance(kept, ImageSet) and not (cfg.augment and augment is not None)
        cache = cache_logits(teacher, kept, device) if cacheable else None
        hooks.append(KnowledgeDistillation(teacher, weight, cfg.temperature, cache, cfg.label_smoothing))
    if evaluate is not None:
        hooks.append(Evaluate(evaluate, cfg.epochs, cfg.eval_every))
    options = _options(cfg, cfg.epochs, seed, augment, show_progress, "student")
    trainer = Trainer(student, options, device, [*hooks, *callbacks], checkpoint=checkpoint)
    history = trainer.fit(kept)
    return history, trainer.resumed_seconds


class LoaderData:
    """A user's DataLoader seen the way distill needs it: its dataset's labels, a pass over every
    example in order (scoring), and a DataLoader over a subset (training; same batch size and workers,
    shuffled with a seeded generator)."""

    def __init__(self, loader: Any):
        self.loader, self.dataset = loader, loader.dataset
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            targets = [int(self.dataset[i][1]) for i in range(len(self.dataset))]
        self.labels = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int):
        from torch.utils.data import DataLoader

        return iter(DataLoader(self.dataset, batch_size=batch_size, shuffle=False,
                               num_workers=self.loader.num_workers))

    def subset(self, indices: torch.Tensor, batch_size: int, seed: int):
        from torch.utils.data import DataLoader, Subset

        g = torch.Generator().manual_seed(derive_seed(seed, "shuffle", "loader"))
        return DataLoader(Subset(self.dataset, indices.tolist()), batch_size=batch_size, shuffle=True,
                          num_workers=self.loader.num_workers, generator=g)


def distill(student: nn.Module, train: Any, config: Optional[DistillConfig] = None, *,
            teacher: Optional[nn.Module] = None, device: Optional[torch.device | str] = None, seed: int = 0,
            augment: Optional[Augment] = None, evaluate: Optional[Measure] = None,
            callbacks: Iterable[Callback] = (), checkpoint: Optional[Path] = None, show_progress: bool = False,
            log: Callable[[str], None] = lambda _m: None) -> tuple[nn.Module, DistillReport]:
    """Prune ``train`` and train ``student`` (in place, from its current weights) on the kept examples
    with knowledge distilled from ``teacher`` (see the module docstring); returns it and a report.
    ``train``: an ImageSet (the loop shuffles, augments and shares it over torchrun's ranks), or a
    DataLoader of ``(image, label)`` over a map-style dataset (yours: its transforms, its workers).
    With several ``config.keep`` values the returned student is the first one's; ``report.sweep`` has a
    row per kept fraction (and without KD too, with ``compare_without_kd``; ``evaluate`` fills them).

    >>> import torch
    >>> from deploypipe import distill, DistillConfig
    >>> from deploypipe.data import ImageSet
    >>> data = ImageSet(torch.rand(64, 1, 4, 4), torch.arange(64) % 4)
    >>> def net():
    ...     return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    >>> cfg = DistillConfig(keep=[0.5], balance="on", epochs=2, lr=0.05, channels_last=False)
    >>> student, report = distill(net(), data, cfg, teacher=net().eval())
    >>> len(report.selection.indices), report.kd_weight, report.selection.per_class
    (32, 0.5, {0: 8, 1: 8, 2: 8, 3: 8})
    """
    cfg = config or DistillConfig()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    if teacher is None and cfg.kd_weight not in (0, 0.0):
        raise ValueError("knowledge distillation needs a teacher — fix: pass teacher=..., or set kd_weight 0 "
                         "(plain training on the kept examples)")
    if teacher is not None:
        teacher = teacher.to(device).eval()
    initial = copy.deepcopy(student.state_dict())  # every student of a sweep starts from the same weights
    loader = None if isinstance(train, ImageSet) else LoaderData(train)
    if loader is not None and cfg.score == "forgetting" and not cfg.scores:
        raise ValueError("forgetting events are counted per example index, which a DataLoader does not give — "
                         "fix: pass an ImageSet, or use score random, el2n or grand")
    t0 = time.perf_counter()
    scores = score_examples(student, loader or train, cfg, device, seed, augment, show_progress, log)
    score_seconds = time.perf_counter() - t0
    metrics: dict[str, float] = {"score_seconds": score_seconds}
    results: dict[tuple[float, bool], tuple[nn.Module, list[dict], Selection, float]] = {}
    for i, keep in enumerate(cfg.keep):
        labels = (loader or train).labels
        selection = select(scores, labels, keep, cfg.band, cfg.balance, seed=seed)
        kept = train.subset(selection.indices) if loader is None else loader.subset(selection.indices,
                                                                                      cfg.batch_size, seed)
        if selection.reason:
            log(f"keep {keep:g}: {len(selection.indices)} of {len(labels)} examples; class-balanced: "
                f"{selection.balanced} "
                f"({selection.reason})")
        for with_kd in ([True, False] if cfg.compare_without_kd else [True]):
            weight = cfg.weight_for(keep) if (with_kd and teacher is not None) else 0.0
            model = student if (i == 0 and with_kd) else copy.deepcopy(student)
            model.load_state_dict(initial)
            t1 = time.perf_counter()
            history, earlier = train_student(model, kept, cfg, teacher, weight, device, seed, augment,
                                             evaluate, callbacks if model is student else (),
                                             checkpoint if model is student else None, show_progress)
            results[keep, with_kd] = (model, history, selection, weight)
            if model is student:
                # a resumed run counts the epochs of its earlier sitting too: the whole training's time
                metrics["train_seconds"] = time.perf_counter() - t1 + earlier
    model, history, selection, weight = results[cfg.keep[0], True]
    sweep = []
    for (keep, with_kd), (_m, hist, sel, w) in results.items():
        final = {k: v for k, v in hist[-1].items() if isinstance(v, float) and k.startswith("test_")}
        sweep.append({"keep": keep, "kd": with_kd, "kd_weight": w, "kept": len(sel.indices), **final})
    metrics.update({"kept_examples": float(len(selection.indices)), "kept_fraction": cfg.keep[0],
                    "kd_weight": weight, "class_balanced": float(selection.balanced)})
    return model, DistillReport(scores, selection, weight, history, sweep, metrics)

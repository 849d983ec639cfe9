"""What a stage is: a registered name, a typed config, and a run function.

    # stages/train/__init__.py: what the command line shows without importing the stage (and torch)
    STAGE = StageInfo(help="Train the model: ...", config="deploypipe.stages.train.config:TrainConfig",
                      headline=("test_top1", "train_seconds"))
    # stages/train/config.py
    class TrainConfig(Schema): ...
    # stages/train/stage.py
    @register("train", distributed="ddp")
    def run(ctx: StageContext, cfg: TrainConfig) -> StageResult: ...

A stage reads only what the context hands it (input model, data splits, device, previous stages'
results) and writes only into ``ctx.out_dir`` (artifacts that become the stage's output once it
finishes) and ``ctx.work_dir`` (private scratch that survives a crash, e.g. checkpoints to resume
from). It never imports mlflow: ``ctx.log_metrics`` / ``ctx.save_table`` / ``ctx.save_figure`` go
through the tracker.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import pkgutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import BaseModel
from torch import nn

from .data import Splits
from .models import ModelRecord


@dataclass
class StageResult:
    """A stage's output: a model (None = pass the input model on), metrics, artifact files."""

    model: Optional[nn.Module] = None
    record: Optional[ModelRecord] = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # filled by the pipeline: the finished stage's files
    # register a folder of the stage's output as a new version of an MLflow registered model, once the
    # files are uploaded: {"name", "path" (inside the output), "tags", "alias"}
    registration: Optional[dict] = None


@dataclass
class StageContext:
    stage_id: str
    model: nn.Module
    record: ModelRecord
    data: Splits
    device: torch.device
    tracker: Any  # deploypipe.tracking.StageTracker; typed loosely so stages never import mlflow
    out_dir: Path
    work_dir: Path
    seed: int
    previous: dict[str, StageResult] = field(default_factory=dict)
    show_progress: bool = True
    rank: int = 0        # under torchrun: this process's rank and the number of ranks (a "shards"
    world_size: int = 1  # stage takes its share; a "ddp" stage trains together, rank 0 alone writes)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def save_table(self, name: str, rows: list[dict]) -> Path:
        """Write rows as ``<out_dir>/<name>.csv`` (logged to MLflow with the stage's artifacts)."""
        path = self.out_dir / f"{name}.csv"
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure (``matplotlib.figure.Figure``: no global backend) as ``<out_dir>/<name>.png``."""
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path


class NullTracker:
    """What a stage logs on a torchrun rank other than 0 of a training stage: nothing."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        pass

    def log_summary(self, metrics: dict[str, float]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, directory: Path) -> None:
        pass

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str], alias: Optional[str]) -> str:
        return ""

    def flush(self) -> None:
        pass

    def end(self, status: str, error: Optional[str] = None) -> None:
        pass


Distributed = Literal["none", "shards", "ddp"]


@dataclass
class Preflight:
    """What a stage's preflight check may look at, before the pipeline's first stage starts: the data,
    the pipeline's input model (None when an earlier stage may hand over another architecture, e.g. a
    distill student), and the folders the earlier stages will write (a file named there will exist).
    A check raises ValueError/TypeError with " — fix: ..." (exit 2) and must be quick: no training,
    no calibration, no certification."""
    stage_id: str
    data: Splits
    model: Optional[nn.Module]
    record: Optional[ModelRecord]  # the model's record (None with the model)
    earlier_stages: list[str]  # the stage names before this one, in order
    earlier_outputs: list[Path]

    def will_exist(self, path: str | Path) -> bool:
        """``path`` exists now or lies in the folder of an earlier stage of this pipeline."""
        p = Path(path).resolve()
        return p.exists() or any(p.is_relative_to(d.resolve()) for d in self.earlier_outputs)


@dataclass
class StageDef:
    name: str
    config: type[BaseModel]
    run: Callable[[StageContext, BaseModel], StageResult]
    help: str
    # under torchrun: "shards" = each rank does its share into its own folder (ctx.rank / ctx.world_size);
    # "ddp" = the ranks train one model together (DistributedDataParallel), rank 0 writes; "none" = refused
    distributed: Distributed = "none"
    # the image shape the stage feeds its input model, given its config and the data's shape (default: the data's)
    model_input_shape: Optional[Callable[[Any, tuple[int, ...]], tuple[int, ...]]] = None
    headline: tuple[str, ...] = ()  # the metrics the summary table shows (all, when empty)
    # checks that need no computation, run for every stage before the pipeline's first stage starts
    preflight: Optional[Callable[[Any, Preflight], None]] = None
    # whether, given its config, the stage hands over a model of another architecture (a distill student)
    replaces_architecture: Optional[Callable[[Any], bool]] = None

    def changes_architecture(self, cfg: Any) -> bool:
        return bool(self.replaces_architecture and self.replaces_architecture(cfg))


REGISTRY: dict[str, StageDef] = {}
def register(name: str, help: str = "", distributed: Distributed = "none",
             model_input_shape: Optional[Callable[[Any, tuple[int, ...]], tuple[int, ...]]] = None,
             headline: tuple[str, ...] = (), preflight: Optional[Callable[[Any, Preflight], None]] = None,
             replaces_architecture: Optional[Callable[[Any], bool]] = None) -> Callable:
    """Register a stage; its config schema is the type of the run function's ``cfg`` argument.
    ``distributed``: what the stage does under torchrun — "shards" (divides its work by ``ctx.rank`` /
    ``ctx.world_size``, each rank writing its own folder), "ddp" (trains with DistributedDataParallel;
    rank 0 alone writes and logs), or "none" (refused there: every rank would redo all of it).
    ``model_input_shape(cfg, data_shape)``: the image shape the stage feeds its input model when that
    is not the data's (DRS certification: half-images); a pipeline's model is checked against it.
    ``preflight(cfg, Preflight)``: checks that need no computation (paths, budgets, data sizes), run
    for every stage of a pipeline before its first stage starts (see ``Preflight``).
    ``replaces_architecture(cfg)``: true when the stage's output model is of another architecture
    than its input (later stages' preflight then gets no model).
    ``help`` and ``headline`` default to the stage package's ``STAGE`` declaration (deploypipe.stage_index)."""

    def deco(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        cfg_type = hints.get("cfg")
        if not (isinstance(cfg_type, type) and issubclass(cfg_type, BaseModel)):
            raise TypeError(f"stage '{name}': run(ctx, cfg) must annotate cfg with a pydantic model")
        info = _declared(fn.__module__)
        REGISTRY[name] = StageDef(name, cfg_type, fn,
                                  help or (info.help if info else (fn.__doc__ or "").strip().split("\n")[0]),
                                  distributed, model_input_shape, tuple(headline or (info.headline if info else ())),
                                  preflight, replaces_architecture)
        return fn

    return deco


def _declared(module: str) -> Any:
    """The StageInfo that the stage package of ``module`` (deploypipe.stages.<name>.stage) declares, if any."""
    from .stage_index import StageInfo

    # a package is imported before its modules
    info = getattr(sys.modules.get(module.rpartition(".")[0]), "STAGE", None)
    return info if isinstance(info, StageInfo) else None


def load_stages() -> dict[str, StageDef]:
    """Import every subpackage of deploypipe.stages that has a ``stage`` module, so each registers
    itself (a subpackage whose algorithm exists but is not wired into pipelines yet has none)."""
    import deploypipe.stages as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"deploypipe.stages.{info.name}.stage"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return REGISTRY

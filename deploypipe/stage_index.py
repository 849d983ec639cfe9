"""What the command line needs to know about the stages without importing them (and torch): each
stage package's ``__init__`` declares a ``STAGE = StageInfo(...)`` — its help, its config class (a
module that imports pydantic only), the figures its summary shows, and the extra commands it brings —
so ``deploypipe --help``, ``deploypipe <stage> --help`` and ``deploypipe stages`` answer in well under
a second. Running a stage imports its ``stage.py`` (deploypipe.stage.load_stages)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class StageInfo:
    help: str
    config: str                                   # "module:Class" of the stage's typed config
    headline: tuple[str, ...] = ()                # the metrics the summary table shows
    commands: tuple[str, ...] = ()                # "module:attr" of extra click commands (light modules)
    options: Optional[str] = None                 # "module:attr" of (click options, intercept) for the command
    name: str = field(default="", compare=False)  # filled in by stage_index()


def load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def stage_index() -> dict[str, StageInfo]:
    """{stage name: StageInfo} of every stage package that declares one."""
    import deploypipe.stages as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"deploypipe.stages.{info.name}")
        stage = getattr(module, "STAGE", None)
        if isinstance(stage, StageInfo):
            out[info.name] = StageInfo(stage.help, stage.config, stage.headline, stage.commands, stage.options,
                                       info.name)
    return out

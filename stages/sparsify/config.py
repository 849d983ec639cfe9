"""The sparsify settings: one typed config for the CLI flags, the YAML and ``deploypipe.sparsify``."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from deploypipe.schema import Schema

from .nm_pattern import Pattern
from .schedules import SRSTE_LAMBDA, Decay, Recipe, default_schedule, parse_schedule


class SparsifyConfig(Schema):
    pattern: str = Field("2:4", description="target N:M pattern along the reduction dimension, e.g. 2:4, 1:8, 1:16")
    recipe: Literal["srste", "mdgf", "sdgf"] = Field(
        "srste", description="SR-STE (baseline), mask decay (MDGF) or structure decay (SDGF)")
    decay: str = Field(
        "exp:auto",
        description="MDGF decay of the pruned weights' multiplier α per optimizer step: exp:RATE (α = exp(-RATE·t)), "
                    "linear:RATE (α = max(0, 1 - RATE·t)), or exp:auto / linear:auto (α reaches 1e-3 / 0 at the end of "
                    "the sparse phase, whatever the epochs); the paper's long schedules used exp:2e-3 (ResNet-50) and "
                    "exp:1e-4 (ViT)")
    schedule: Optional[str] = Field(
        None,
        description="SDGF patterns over the sparse phase, ending at the target, e.g. 7:8,4:8,2:8,1:8 or "
                    "8:64,4:32,2:16,1:8; default: (M-1):M halving down to the target")
    srste_lambda: Optional[float] = Field(
        None, ge=0,
        description="λ of the SR-STE regulariser on pruned weights; default 2e-4 for srste, 0 for mdgf/sdgf")
    epochs: int = Field(10, ge=1, description="training epochs (all phases)")
    dense_fraction: float = Field(0.0, ge=0, lt=1, description="share of the steps trained dense first")
    sparse_fraction: float = Field(
        0.7, gt=0, le=1,
        description="share of the steps in the sparse (decay) phase; the rest fine-tunes with the hard target mask")
    from_scratch: bool = Field(False, description="re-initialise the weights instead of fine-tuning the input model")
    include: list[str] = Field(["*"], description="glob patterns of layer names to sparsify")
    exclude: list[str] = Field([], description="glob patterns of layer names to keep dense")
    keep_first_last: bool = Field(True, description="keep the first and last layer dense")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (Nesterov momentum) or AdamW")
    lr: float = Field(0.02, gt=0, description="peak learning rate (fine-tuning; raise it from scratch)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (not on biases/norms)")
    schedule_lr: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="learning-rate schedule")
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    augment: bool = Field(True, description="use the data's standard augmentation")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets")
    eval_every: int = Field(1, ge=0, description="evaluate on the test split every N epochs (0 = only at the end)")
    kernels: Literal["auto", "triton", "reference"] = Field(
        "auto",
        description="kernel backend: Triton on CUDA (auto), Triton always (on CPU: the interpreter, needs "
                    "TRITON_INTERPRET=1), or the PyTorch reference")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return str(Pattern.parse(v))

    @field_validator("decay")
    @classmethod
    def _decay(cls, v: str) -> str:
        return str(Decay.parse(v))

    @model_validator(mode="after")
    def _schedule(self) -> "SparsifyConfig":
        self.patterns()  # checked before anything runs
        return self

    def patterns(self) -> tuple[Pattern, ...]:
        """The SDGF schedule (empty for the other recipes)."""
        target = Pattern.parse(self.pattern)
        if self.recipe == "sdgf":
            return tuple(parse_schedule(self.schedule, target) if self.schedule else default_schedule(target))
        if self.schedule:
            raise ValueError(f"schedule is for the sdgf recipe, not {self.recipe} — fix: set recipe sdgf "
                             "(--recipe sdgf) or drop schedule")
        return ()

    def recipe_for(self, total_steps: int) -> Recipe:
        target, schedule = Pattern.parse(self.pattern), self.patterns()
        lam = self.srste_lambda if self.srste_lambda is not None else (SRSTE_LAMBDA if self.recipe == "srste" else 0.0)
        return Recipe(self.recipe, target, total_steps, self.dense_fraction, self.sparse_fraction,
                      Decay.parse(self.decay), schedule, lam)

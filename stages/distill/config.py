"""The distill settings: one typed config for the CLI flags, the YAML and ``deploypipe.distill``."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from deploypipe.schema import Schema


class DistillConfig(Schema):
    teacher: Optional[str] = Field(
        None, description="the teacher: zoo:NAME, package.module:factory or a saved model/ folder (default: the "
                          "pipeline's model, e.g. the train stage's output)")
    student: Optional[str] = Field(
        None, description="the student's architecture: zoo:NAME or package.module:factory, trained from scratch "
                          "(default: the teacher's architecture, fresh weights)")
    score: Literal["random", "el2n", "grand", "grand-last", "forgetting"] = Field(
        "random", description="how to rank the training examples: random, EL2N, GraNd (full-parameter gradient "
                              "norm), grand-last (its last-layer approximation), forgetting events")
    scores: Optional[str] = Field(
        None, description="a file of your own scores, one per training example in order (.npy, or .csv with a "
                          "score column); replaces score")
    keep: list[float] = Field([0.5], min_length=1,
                              description="fraction(s) of the training set to keep; several = a sweep "
                                          "(distill.png), the first one's student is the stage's model")
    band: Literal["hardest", "easiest", "middle"] = Field("hardest", description="which examples of the ranking")
    balance: Literal["auto", "on", "off"] = Field(
        "auto", description="class balance of the kept set: on, off, or auto (on when a class would keep less "
                            "than half its fair share)")
    kd_weight: Union[Literal["auto"], float] = Field(
        "auto", description="lambda of (1 - lambda) CE + lambda tau^2 KL; auto grows as the kept fraction shrinks "
                            "(clip(1 - keep, 0.1, 0.9)); 0 = no teacher")
    temperature: float = Field(4.0, gt=0, description="tau of the distillation softmax")
    compare_without_kd: bool = Field(False, description="also train each kept fraction without KD (for distill.png)")
    score_epochs: int = Field(2, ge=1, description="epochs of the short training runs EL2N / GraNd score with")
    score_seeds: int = Field(2, ge=1, description="models (seeds) EL2N / GraNd average over")
    forgetting_epochs: Optional[int] = Field(None, ge=2, description="epochs of the run forgetting events are "
                                                                     "counted over (default: epochs)")
    epochs: int = Field(15, ge=1, description="epochs of the student on the kept set")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (Nesterov momentum) or AdamW")
    lr: float = Field(0.2, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (not on biases/norms)")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="learning-rate schedule")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (the hard term)")
    augment: bool = Field(True, description="use the data's standard augmentation (teacher logits are then "
                                            "computed on the fly, not cached)")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets")
    eval_every: int = Field(1, ge=0, description="evaluate on the test split every N epochs (0 = only at the end)")

    @field_validator("keep")
    @classmethod
    def _keep(cls, value: list[float]) -> list[float]:
        bad = [k for k in value if not 0 < k <= 1]
        if bad:
            raise ValueError(f"keep {bad} is not a fraction in (0, 1] — fix: give e.g. --keep 0.3 or "
                             "--keep 0.1,0.3,0.5")
        return value

    @field_validator("kd_weight", mode="before")
    @classmethod
    def _weight(cls, value):
        if isinstance(value, str) and value.strip().lower() != "auto":
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"kd_weight must be auto or a number in [0, 1], got {value!r}") from None
        if not isinstance(value, str) and not 0 <= float(value) <= 1:
            raise ValueError(f"kd_weight must be auto or a number in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _teacher_needed(self) -> "DistillConfig":
        if self.compare_without_kd and self.kd_weight == 0:
            raise ValueError("compare_without_kd compares against KD, but kd_weight is 0 — fix: drop one of them")
        return self

    def weight_for(self, keep: float) -> float:
        from .kd import auto_kd_weight

        return auto_kd_weight(keep) if self.kd_weight == "auto" else float(self.kd_weight)

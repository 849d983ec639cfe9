"""The train settings (pydantic only: the CLI reads them without importing torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from deploypipe.schema import Schema

SIDES = ("left", "right")  # the two halves of the DRS diagonal split


class TrainConfig(Schema):
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (Nesterov momentum) or AdamW")
    lr: float = Field(0.2, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled for AdamW; not applied to biases/norms")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="learning-rate schedule")
    warmup_epochs: float = Field(
        0.0, ge=0, description="linear warm-up (cosine/constant; onecycle ramps 30% by default)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise on [0,1] inputs (for certify); 0 = off")
    consistency: float = Field(
        0.0, ge=0,
        description="with noise_sigma: weight of the consistency regulariser (Jeong & Shin 2020; e.g. 10-20); 0 = off")
    consistency_copies: int = Field(2, ge=2, description="noisy copies per image for the consistency regulariser")
    consistency_entropy: float = Field(
        0.5, ge=0, description="weight of the entropy term of the consistency regulariser")
    drs_side: Optional[Literal["left", "right", "both"]] = Field(
        None,
        description="train a dual-randomized-smoothing base classifier on this half of the diagonal split, or (both) "
                    "one model for both halves (the model then takes C x H x W/2 images)")
    drs_input: Literal["half", "full"] = Field(
        "half",
        description="with drs_side left or right, what the network sees: half = the packed C x H x W/2 sub-image; full "
                    "= the side's pixels in their places of the C x H x W grid, each other pixel the mean of its 4 "
                    "neighbours (twice the compute; a model trained on full images keeps its features)")
    augment: bool = Field(True, description="use the data's standard augmentation (crop, flip)")
    max_grad_norm: Optional[float] = Field(None, gt=0, description="clip the gradient norm")
    eval_every: int = Field(1, ge=0, description="evaluate on the test split every N epochs (0 = only at the end)")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets (faster on CPU)")
    resume: bool = Field(True, description="resume from the last per-epoch checkpoint of an interrupted run")

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":  # checked before a work directory is made
        if self.consistency > 0 and self.noise_sigma <= 0:
            raise ValueError("consistency needs Gaussian noise: set noise_sigma > 0 (e.g. --noise-sigma 0.25) or drop "
                             "consistency")
        if self.drs_input == "full" and self.drs_side not in SIDES:
            raise ValueError("drs_input full fills one side's grid: set drs_side left or right (one model per side) or "
                             "drop drs_input")
        return self

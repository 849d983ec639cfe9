"""train: supervised training of the pipeline's model (baseline and teacher for later stages)."""

from .loop import make_optimizer, make_scheduler, train_epoch

__all__ = ["make_optimizer", "make_scheduler", "train_epoch"]

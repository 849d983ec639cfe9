"""train: supervised training of the pipeline's model (baseline and teacher for later stages) on
the shared loop of deploypipe.training."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Train the model: SGD/AdamW, one-cycle/cosine, label smoothing, Gaussian-noise augmentation",
    config="deploypipe.stages.train.config:TrainConfig", headline=("test_top1", "test_top1_noisy", "train_seconds"))

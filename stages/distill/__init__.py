"""distill: data pruning (random, EL2N, GraNd, forgetting) with knowledge distillation (Ben-Baruch et al.)."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Data pruning (random, EL2N, GraNd, forgetting) with knowledge distillation into a student trained on the "
         "kept examples",
    config="deploypipe.stages.distill.config:DistillConfig",
    headline=("test_top1", "teacher_test_top1", "kept_examples", "train_seconds"))

"""sparsify: N:M structured-sparse training (SR-STE, MDGF, SDGF) on the kernels of deploypipe.kernels."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="N:M structured sparsity by training: SR-STE, mask decay (MDGF), structure decay (SDGF)",
    config="deploypipe.stages.sparsify.config:SparsifyConfig",
    headline=("test_top1", "dense_top1", "sparse_layer_sparsity", "train_seconds"),
    commands=("deploypipe.stages.sparsify.check_command:check_sparsity",))

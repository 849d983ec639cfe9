"""evaluate: top-1, loss, size and CPU latency of the pipeline's current model."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Measure top-1, loss, parameter count, size and CPU latency of the current model",
    config="deploypipe.stages.evaluate.config:EvaluateConfig",
    headline=("test_top1", "size_bytes", "latency_ms_median"))

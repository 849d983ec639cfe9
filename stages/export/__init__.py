"""export: ONNX, TensorRT engines and a deploy bundle of the model a pipeline made, checked and registered."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Export the model that ships: ONNX (checked in ONNX Runtime), TensorRT engine, Triton bundle, model card, "
         "registered MLflow version",
    config="deploypipe.stages.export.config:ExportConfig",
    headline=("test_top1", "onnx_top1_agreement", "trt_lint_findings", "engine_bytes", "onnxruntime_speedup_b64",
              "shipped_acr"),
    commands=("deploypipe.stages.export.commands:promote",), options="deploypipe.stages.export.commands:CHECK_OPTIONS")

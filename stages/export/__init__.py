"""export: ONNX, TensorRT engines and a deploy bundle of the model a pipeline made, checked and registered."""

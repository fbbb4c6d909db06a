"""What runs on the device: data loading and replay, features, the incremental learner,
ONNX export/import, onnxruntime inference and the agent loop."""

"""What runs on the server: rounds, aggregation strategies (ONNX in, ONNX out, no
scikit-learn), validation of updates, the model registry and the results store."""

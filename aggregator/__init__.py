"""What runs on the server: rounds, aggregation strategies (ONNX in, ONNX out, no
scikit-learn), validation of updates, and the model registry. Results go to
`turbofed.store`."""

"""What runs on the device: streaming features, the incremental learner, onnxruntime
inference, the training buffer and the agent loop. Nothing else (host tools live in
`turbofed.data`, `turbofed.simulation` and `turbofed.deploy`)."""

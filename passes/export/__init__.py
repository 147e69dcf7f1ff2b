"""Export forms: a fused GraphModule in, a new GraphModule sharing its tensors out, with attention
calls rewritten into forms torch's ONNX exporter takes (:mod:`.export_forms`)."""

"""Backends: the quantized graph lowered to integer kernels (ONNX Runtime, Inductor), and the check that the
lowered model computes what the reference does."""

"""Quantizer math (grids, thresholds), the observers and fake-quant modules that hold a quantized model's state."""

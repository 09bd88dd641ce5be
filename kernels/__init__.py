"""Fused kernels (CUDA source + JIT loader) and a pure-PyTorch reference of each; CPU runs use the reference."""

"""Files: reports, plots, checkpoints, and quantized models saved and loaded without pickle."""

"""fxq's graph passes, one module each, in pipeline order (see fxq.pipeline)."""

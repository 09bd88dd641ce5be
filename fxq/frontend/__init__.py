"""Front-ends: a model becomes the one IR (a torch.fx GraphModule), by symbolic tracing, torch.export, or the
graph torch.compile hands a backend."""

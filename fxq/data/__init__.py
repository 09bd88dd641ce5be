"""Images, batches, models by name and evaluation."""

"""Images, batches, models by name and evaluation."""

from fxq.data.evaluate import evaluate
from fxq.data.images import ImageSet, Preprocess, batches, load_images
from fxq.data.models import LoadedModel, load_model

__all__ = ["ImageSet", "Preprocess", "batches", "load_images", "LoadedModel", "load_model", "evaluate"]

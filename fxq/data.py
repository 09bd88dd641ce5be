"""Image folders: listing, optional labels.tsv, preprocessing, decoding into memory with a progress bar."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from fxq.errors import DataError

__all__ = [
    "Preprocess",
    "ImageSet",
    "list_images",
    "read_labels",
    "load_images",
    "default_data_dir",
    "batches",
    "batch_inputs",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize`, centre-crop `crop`, scale to [0, 1], normalise.

    Images whose short side already lies in [crop, resize] are only cropped: pre-scaled sets (the shared
    val images are stored at 227 px) would lose detail to a second resampling.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: Image.Image) -> Tensor:
        img = img.convert("RGB")
        if not self.crop <= min(img.size) <= self.resize:
            img = TF.resize(img, self.resize, interpolation=TF.InterpolationMode.BILINEAR)
        x = TF.to_tensor(TF.center_crop(img, self.crop))
        return TF.normalize(x, self.mean, self.std)


@dataclass
class ImageSet:
    x: Tensor  # (N, 3, crop, crop), normalised
    y: Tensor | None  # (N,) class indices when the folder has labels.tsv
    files: list[str]

    def __len__(self) -> int:
        return self.x.shape[0]


def default_data_dir() -> Path:
    """../shared/data beside the project root, or $FXQ_DATA."""
    if "FXQ_DATA" in os.environ:
        return Path(os.environ["FXQ_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


def list_images(folder: str | os.PathLike) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"image folder '{folder}' does not exist; pass an existing folder (--calib/--val DIR) "
            f"or set FXQ_DATA to the folder holding imagenet/calib and imagenet/val"
        )
    files = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(
            f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)}); point to a folder of images"
        )
    return files


def read_labels(folder: str | os.PathLike) -> dict[str, int] | None:
    """labels.tsv: one 'file<TAB>class index' line per image; None when the folder has none."""
    path = Path(folder) / "labels.tsv"
    if not path.exists():
        return None
    labels = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            raise DataError(f"{path}:{i}: expected 'file<TAB>class index', got {line!r}")
        labels[parts[0].strip()] = int(parts[1])
    return labels


def _decode(path: Path, pre: Preprocess) -> Tensor:
    try:
        with Image.open(path) as img:
            return pre(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot decode image '{path}': {e}; remove or replace the file") from None


def load_images(
    folder: str | os.PathLike,
    pre: Preprocess,
    limit: int | None = None,
    labeled: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> ImageSet:
    """Decode a folder (first `limit` images in file order) into one tensor; PIL decodes in threads."""
    folder = Path(folder)
    files = list_images(folder)
    labels = read_labels(folder)
    if labeled:
        if labels is None:
            raise DataError(f"'{folder}' has no labels.tsv; evaluation needs labels (file<TAB>class index)")
        files = [f for f in files if f in labels]
        if not files:
            raise DataError(f"no image in '{folder}' is listed in its labels.tsv")
    files = files[:limit] if limit else files
    with ThreadPoolExecutor(max(1, workers)) as pool:
        it = pool.map(lambda f: _decode(folder / f, pre), files)
        xs = list(tqdm(it, total=len(files), desc=f"load {folder.name}", unit="img", disable=not progress))
    y = torch.tensor([labels[f] for f in files]) if labels is not None and all(f in labels for f in files) else None
    return ImageSet(torch.stack(xs), y, files)


def batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return list(x.split(batch_size))


def batch_inputs(batch) -> Tensor:
    """A batch is a tensor, or (inputs, labels) as image loaders yield: the inputs."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise DataError(f"batches must be tensors or (tensor, labels) pairs, got {type(batch).__name__}")

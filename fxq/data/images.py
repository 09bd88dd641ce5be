"""Image sets: folders (optional labels.tsv) or .npz files of encoded images; preprocessing, decoding into memory
with a progress bar."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    "load_npz_images",
    "default_data_dir",
    "batches",
    "batch_inputs",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NPZ_EXT = ".npz"
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
            f"image folder '{folder}' does not exist; pass an existing folder (--calib/--val DIR) or {NPZ_EXT} "
            f"image set, or set FXQ_DATA to the folder holding imagenet/calib and imagenet/val"
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


def _decode(source: Path | io.BytesIO, pre: Preprocess, where: str, fix: str) -> Tensor:
    """One image (a file, or encoded bytes) preprocessed; the error names it (`where`) and the remedy (`fix`)."""
    try:
        with Image.open(source) as img:
            return pre(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot decode {where}: {e}; {fix}") from None


def _decode_all(items: list, decode, desc: str, progress: bool, workers: int) -> Tensor:
    """decode(item) for every item, in threads (PIL releases the GIL), stacked, with a progress bar."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        xs = list(tqdm(pool.map(decode, items), total=len(items), desc=desc, unit="img", disable=not progress))
    return torch.stack(xs)


def load_images(
    folder: str | os.PathLike,
    pre: Preprocess,
    limit: int | None = None,
    labeled: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> ImageSet:
    """Decode a folder (first `limit` images in file order) into one tensor; PIL decodes in threads.

    A path ending in .npz is read by `load_npz_images` instead, so every --calib/--val argument takes either.
    """
    folder = Path(folder)
    if folder.suffix.lower() == NPZ_EXT:
        return load_npz_images(folder, pre, limit, labeled, progress, workers)
    files = list_images(folder)
    labels = read_labels(folder)
    if labeled:
        if labels is None:
            raise DataError(f"'{folder}' has no labels.tsv; evaluation needs labels (file<TAB>class index)")
        files = [f for f in files if f in labels]
        if not files:
            raise DataError(f"no image in '{folder}' is listed in its labels.tsv")
    files = files[:limit] if limit else files

    def decode(f: str) -> Tensor:
        return _decode(folder / f, pre, f"image '{folder / f}'", "remove or replace the file")

    x = _decode_all(files, decode, f"load {folder.name}", progress, workers)
    y = torch.tensor([labels[f] for f in files]) if labels is not None and all(f in labels for f in files) else None
    return ImageSet(x, y, files)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str] | None]:
    """(encoded bytes, offsets, labels or None, names or None), checked against each other."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("it holds one array, not an .npz archive of named arrays")
        with z:
            missing = [k for k in ("jpeg_bytes", "offsets") if k not in z.files]
            if missing:
                raise DataError(
                    f"'{path}' lacks the arrays {missing} (has {z.files}); an .npz image set holds jpeg_bytes "
                    f"(uint8, concatenated encoded images) and offsets (N+1), optionally labels and names"
                )
            data, offsets = z["jpeg_bytes"], z["offsets"]
            labels = z["labels"] if "labels" in z.files else None
            names = [str(n) for n in z["names"]] if "names" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read '{path}' as an .npz image set: {e}; replace the file") from None
    n = len(offsets) - 1
    if data.dtype != np.uint8 or data.ndim != 1:
        raise DataError(
            f"'{path}': jpeg_bytes must be a 1-D uint8 array, got {data.dtype} {data.shape}; replace the file"
        )
    if (
        offsets.ndim != 1
        or not np.issubdtype(offsets.dtype, np.integer)
        or n < 1
        or offsets[0] != 0
        or (np.diff(offsets) <= 0).any()
        or offsets[-1] > len(data)
    ):
        raise DataError(
            f"'{path}': offsets must rise from 0 to at most len(jpeg_bytes) = {len(data)}, one more than the "
            f"number of images; the file is corrupt, replace it"
        )
    for what, a in (("labels", labels), ("names", names)):
        if a is not None and len(a) != n:
            raise DataError(f"'{path}': {len(a)} {what} for {n} images; the file is corrupt, replace it")
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': labels must be integer class indices, got {labels.dtype}; replace the file")
    return data, offsets, labels, names


def load_npz_images(
    path: str | os.PathLike,
    pre: Preprocess,
    limit: int | None = None,
    labeled: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> ImageSet:
    """Decode an .npz image set (first `limit` images) into one tensor, like `load_images` does a folder.

    The file holds the encoded images back to back: image i is jpeg_bytes[offsets[i]:offsets[i+1]] (any format
    PIL reads); labels (N,) and names (N,) are optional. The shared CIFAR-10 sets are stored this way.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"image set '{path}' does not exist; pass an existing {NPZ_EXT} file or image folder (--calib/--val), "
            f"or set FXQ_DATA to the shared data folder (it holds cifar10/*{NPZ_EXT})"
        )
    data, offsets, labels, names = _read_npz(path)
    if labeled and labels is None:
        raise DataError(f"'{path}' has no labels array; evaluation needs labels (N class indices)")
    n = len(offsets) - 1
    n = min(n, limit) if limit else n
    names = names[:n] if names is not None else [f"{i:05d}" for i in range(n)]

    def decode(i: int) -> Tensor:
        buf = io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())
        return _decode(buf, pre, f"image {i} ('{names[i]}') of '{path}'", "the file is corrupt, replace it")

    x = _decode_all(list(range(n)), decode, f"load {path.name}", progress, workers)
    y = torch.from_numpy(labels[:n].astype(np.int64)) if labels is not None else None
    return ImageSet(x, y, names)


def batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return list(x.split(batch_size))


def batch_inputs(batch) -> Tensor:
    """A batch is a tensor, or (inputs, labels) as image loaders yield: the inputs."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise DataError(f"batches must be tensors or (tensor, labels) pairs, got {type(batch).__name__}")

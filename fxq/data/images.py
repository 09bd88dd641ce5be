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

from fxq.data.subset import Subset, choose
from fxq.errors import ConfigError, DataError, first_line

__all__ = [
    "Preprocess",
    "ImageSet",
    "list_images",
    "read_labels",
    "load_images",
    "load_npz_images",
    "check_image_source",
    "default_data_dir",
    "batches",
    "batch_inputs",
    "Call",
    "call_args",
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
        img = to_rgb(img)
        if not self.crop <= min(img.size) <= self.resize:
            img = TF.resize(img, self.resize, interpolation=TF.InterpolationMode.BILINEAR)
        x = TF.to_tensor(TF.center_crop(img, self.crop))
        return TF.normalize(x, self.mean, self.std)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any mode PIL decodes. 16-bit and 32-bit integer and float greyscale are scaled to 8 bits (PIL's
    own convert would clip them at 255); palette, alpha, CMYK and 1-bit images take PIL's conversion."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img, dtype=np.uint16).astype(np.float64) / 257.0
    elif img.mode == "I":
        a = np.asarray(img, dtype=np.int64).astype(np.float64)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0  # 16-bit PNGs open as "I"
        a = a * (255.0 / hi)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("a float image holds NaN or infinite values")
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    else:
        return img.convert("RGB")
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


@dataclass
class ImageSet:
    x: Tensor  # (N, 3, crop, crop), normalised
    y: Tensor | None  # (N,) class indices when the folder has labels.tsv
    files: list[str]
    chosen: str = ""  # how the images were picked from their set, e.g. "32 of 10000 images drawn at random"

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
    try:
        entries = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS), key=lambda f: f.name)
    except OSError as e:
        raise DataError(f"cannot list image folder '{folder}': {e.strerror}; check its permissions") from None
    odd = [f.name for f in entries if not f.is_file()]  # a folder, a FIFO or a device named like an image
    if odd:
        raise DataError(
            f"'{folder / odd[0]}' is not a regular file ({len(odd)} such entries in '{folder}'); an image folder "
            f"holds image files only: move it away"
        )
    if not entries:
        raise DataError(
            f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)}); point to a folder of images"
        )
    return [f.name for f in entries]


LABELS_FILE = "labels.tsv"


def read_labels(folder: str | os.PathLike) -> dict[str, int] | None:
    """labels.tsv: one 'file<TAB>class index' line per image (UTF-8, a BOM allowed); None when the folder has
    none. A malformed row, a negative index or a file listed twice is an error naming the line."""
    path = Path(folder) / LABELS_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise DataError(f"'{path}' is not a regular file; {LABELS_FILE} holds one 'file<TAB>class index' per line")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 with one "
            f"'file<TAB>class index' line per image"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from None
    labels: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip().isdigit():
            raise DataError(
                f"{path}:{i}: expected 'file<TAB>class index' (an index >= 0), got {line[:80]!r}; fix that line"
            )
        name = parts[0].strip()
        if name in labels:
            raise DataError(f"{path}:{i}: '{name}' is listed twice; keep one line per image")
        labels[name] = int(parts[1])
    if not labels:
        raise DataError(f"'{path}' lists no images; write one 'file<TAB>class index' line per image, or remove it")
    return labels


def check_image_source(source: str | os.PathLike, labeled: bool = False) -> None:
    """Refuse a missing or malformed image folder or .npz set before any image is decoded: the folder lists
    images (and readable labels when `labeled`), the .npz file holds a well-formed set."""
    source = Path(source)
    if source.suffix.lower() == NPZ_EXT:
        _npz_set(source, labeled)
    else:
        list_images(source)
        _folder_labels(source, labeled)


def _folder_labels(folder: Path, labeled: bool) -> dict[str, int] | None:
    """read_labels, refusing a folder without labels.tsv when labels are needed."""
    labels = read_labels(folder)
    if labeled and labels is None:
        raise DataError(f"'{folder}' has no {LABELS_FILE}; evaluation needs labels (file<TAB>class index)")
    return labels


def _npz_set(path: Path, labeled: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str] | None]:
    """_read_npz of an existing file, refusing a set without labels when labels are needed."""
    if not path.is_file():
        raise DataError(
            f"image set '{path}' does not exist or is not a file; pass an existing {NPZ_EXT} file or image folder "
            f"(--calib/--val), or set FXQ_DATA to the shared data folder (it holds cifar10/*{NPZ_EXT})"
        )
    data, offsets, labels, names = _read_npz(path)
    if labeled and labels is None:
        raise DataError(f"'{path}' has no labels array; evaluation needs labels (N class indices)")
    return data, offsets, labels, names


def _as_subset(subset: Subset | int | None) -> Subset:
    if isinstance(subset, Subset):
        return subset
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int)):
        raise ConfigError(f"a subset is a count or a Subset, got {subset!r}")
    return Subset(subset)


def _decode(source: Path | io.BytesIO, pre: Preprocess, where: str, fix: str) -> Tensor:
    """One image (a file, or encoded bytes) preprocessed; the error names it (`where`) and the remedy (`fix`)."""
    try:
        with Image.open(source) as img:  # reads the header only: the size is known before any pixel is decoded
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width} x {img.height} pixels")
            return pre(img)
    except Image.DecompressionBombError as e:
        raise DataError(
            f"refusing {where}: {e}, more than PIL's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS}), a possible "
            f"decompression bomb; resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise DataError(f"cannot decode {where}: {first_line(e)}; {fix}") from None


def _decode_all(items: list, decode, desc: str, progress: bool, workers: int) -> Tensor:
    """decode(item) for every item, in threads (PIL releases the GIL), stacked, with a progress bar."""
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        xs = list(tqdm(pool.map(decode, items), total=len(items), desc=desc, unit="img", disable=not progress))
    finally:  # a bad image or an interrupt stops the decoding of the rest at once
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.stack(xs)


def load_images(
    folder: str | os.PathLike,
    pre: Preprocess,
    subset: Subset | int | None = None,
    labeled: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> ImageSet:
    """Decode a folder (all images, or the `subset`: a count draws that many at random, spread over the classes of
    labels.tsv when it exists) into one tensor; PIL decodes in threads.

    A path ending in .npz is read by `load_npz_images` instead, so every --calib/--val argument takes either.
    """
    folder = Path(folder)
    if folder.suffix.lower() == NPZ_EXT:
        return load_npz_images(folder, pre, subset, labeled, progress, workers)
    subset = _as_subset(subset)
    files = list_images(folder)
    labels = _folder_labels(folder, labeled)
    if labels is not None:
        unlisted = [f for f in files if f not in labels]
        absent = sorted(set(labels) - set(files))
        if labeled and unlisted:
            raise DataError(
                f"'{folder}': {len(unlisted)} images are not in its {LABELS_FILE} (e.g. '{unlisted[0]}'); list "
                f"each image with its class index, or move the unlabeled ones away"
            )
        if labeled and absent:
            raise DataError(
                f"'{folder / LABELS_FILE}' lists {len(absent)} files the folder does not hold (e.g. '{absent[0]}'); "
                f"remove those lines or restore the images"
            )
    known = labels is not None and all(f in labels for f in files)
    idx, chosen = choose(len(files), subset, [labels[f] for f in files] if known else None)
    files = [files[i] for i in idx.tolist()]

    def decode(f: str) -> Tensor:
        return _decode(folder / f, pre, f"image '{folder / f}'", "remove or replace the file")

    x = _decode_all(files, decode, f"load {folder.name}", progress, workers)
    y = torch.tensor([labels[f] for f in files]) if known else None
    return ImageSet(x, y, files, chosen)


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
    if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(
            f"'{path}': labels must be a 1-D array of integer class indices, got {labels.dtype} {labels.shape}; "
            f"replace the file"
        )
    if labels is not None and len(labels) and labels.min() < 0:
        raise DataError(f"'{path}': labels hold a negative class index ({labels.min()}); replace the file")
    for what, a in (("labels", labels), ("names", names)):
        if a is not None and len(a) != n:
            raise DataError(f"'{path}': {len(a)} {what} for {n} images; the file is corrupt, replace it")
    return data, offsets, labels, names


def load_npz_images(
    path: str | os.PathLike,
    pre: Preprocess,
    subset: Subset | int | None = None,
    labeled: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> ImageSet:
    """Decode an .npz image set (all, or the `subset`, stratified by its labels when it has them) into one
    tensor, like `load_images` does a folder.

    The file holds the encoded images back to back: image i is jpeg_bytes[offsets[i]:offsets[i+1]] (any format
    PIL reads); labels (N,) and names (N,) are optional. The shared CIFAR-10 sets are stored this way.
    """
    path = Path(path)
    data, offsets, labels, names = _npz_set(path, labeled)
    n = len(offsets) - 1
    idx, chosen = choose(n, _as_subset(subset), labels)
    names = names if names is not None else [f"{i:05d}" for i in range(n)]

    def decode(i: int) -> Tensor:
        buf = io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())
        return _decode(buf, pre, f"image {i} ('{names[i]}') of '{path}'", "the file is corrupt, replace it")

    picked = idx.tolist()
    x = _decode_all(picked, decode, f"load {path.name}", progress, workers)
    y = torch.from_numpy(labels[idx.numpy()].astype(np.int64)) if labels is not None else None
    return ImageSet(x, y, [names[i] for i in picked], chosen)


def batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return list(x.split(batch_size))


class Call(tuple):
    """The positional arguments of one call, as a calibration batch for a module whose forward takes something
    other than one tensor (a detection head's list of feature maps). Round-to-nearest calibrates on such batches;
    the methods that read images (EPTQ, mixed precision) need plain image batches."""


def call_args(batch) -> tuple:
    """What to call a graph with for `batch`: a Call's arguments, else the batch's inputs alone."""
    return tuple(batch) if isinstance(batch, Call) else (batch_inputs(batch),)


def batch_inputs(batch) -> Tensor:
    """A batch is a tensor, or (inputs, labels) as image loaders yield: the inputs."""
    if isinstance(batch, Call):
        raise DataError(
            "this stage needs image batches (one tensor per batch), and the calibration data are the recorded calls "
            "of a model part; quantize such a part round-to-nearest"
        )
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise DataError(f"batches must be tensors or (tensor, labels) pairs, got {type(batch).__name__}")

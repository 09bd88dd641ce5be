import pytest
import torch
from PIL import Image

from fxq.data.images import Preprocess, load_images, read_labels
from fxq.errors import DataError
from tests.conftest import write_images


def test_loads_images_and_labels(tmp_path):
    folder = write_images(tmp_path / "imgs", 5)
    s = load_images(folder, Preprocess(resize=36, crop=32), progress=False, labeled=True)
    assert s.x.shape == (5, 3, 32, 32) and s.y.tolist() == [0, 1, 2, 3, 4]
    assert s.files[0] == "img_000.png"
    assert load_images(folder, Preprocess(resize=36, crop=32), subset=2, progress=False).x.shape[0] == 2


def test_preprocess_crops_prescaled_images_without_resampling():
    img = Image.new("RGB", (227, 227), (255, 0, 0))
    img.putpixel((2, 2), (0, 0, 255))  # lies outside a centre crop of 224 (offset 1 or 2)
    x = Preprocess(mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x.shape == (3, 224, 224)
    big = Image.new("RGB", (512, 400))
    assert Preprocess()(big).shape == (3, 224, 224)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"image folder '.*nope' does not exist; pass an existing folder"):
        load_images(tmp_path / "nope", Preprocess(), progress=False)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        load_images(tmp_path / "empty", Preprocess(), progress=False)


def test_corrupt_image_is_named(tmp_path):
    folder = write_images(tmp_path / "imgs", 3)
    (folder / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot decode image '.*img_001.png'.*remove or replace the file"):
        load_images(folder, Preprocess(resize=36, crop=32), progress=False)


def test_labels_needed_for_evaluation(tmp_path):
    folder = write_images(tmp_path / "imgs", 2, labels=False)
    with pytest.raises(DataError, match="has no labels.tsv"):
        load_images(folder, Preprocess(resize=36, crop=32), labeled=True, progress=False)


def test_bad_labels_line(tmp_path):
    folder = write_images(tmp_path / "imgs", 2)
    (folder / "labels.tsv").write_text("img_000.png\tcat\n")
    with pytest.raises(DataError, match=r"labels.tsv:1: expected 'file<TAB>class index'"):
        read_labels(folder)


def test_normalisation_values():
    img = Image.new("RGB", (224, 224), (127, 127, 127))
    x = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)(img)
    torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-6, rtol=0)

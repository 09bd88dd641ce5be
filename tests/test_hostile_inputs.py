"""Hostile input, faults and interrupts against the command line: each case asserts the exit code, one
`fxq: error:` line naming the cause, the error class where the API raises it, and nothing left on disk."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fxq
from fxq.cli import main
from fxq.data.images import Preprocess, load_images, load_npz_images, read_labels
from fxq.data.models import CIFAR_PREPROCESS, load_model
from fxq.data.subset import Subset, choose
from fxq.errors import CheckpointError, ConfigError, DataError, ModelError, OutputError
from fxq.io.checkpoint import load_checkpoint, save_checkpoint
from fxq.io.files import check_output_file, check_output_folder, result_folder, write_json_atomic
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
MODEL = ["--model", "cifar10_resnet20", "--random-weights", "--device", "cpu", "--quiet"]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused(capsys, args: list[str], *fragments: str, code: int = 2) -> str:
    """Run the CLI; assert the exit code, one `fxq: error:` line holding every fragment, and return it."""
    got = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("fxq: error: "), err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])
    return lines[0]


@pytest.fixture
def sets(tmp_path):
    """A 32-px calibration folder and a labeled val folder, and the tree as it was before the run."""
    calib = write_images(tmp_path / "calib", 4, size=(32, 32), labels=False)
    val = write_images(tmp_path / "val", 6, size=(32, 32))
    return calib, val


def quantize_args(calib, val, out, *extra) -> list[str]:
    return [
        "quantize",
        *MODEL,
        "--calib",
        str(calib),
        "--val",
        str(val),
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def assert_untouched(tmp_path: Path, before: set[str]) -> None:
    after = tree(tmp_path)
    assert after == before, sorted(after ^ before)


def refused_cleanly(tmp_path: Path, capsys, args: list[str], *fragments: str) -> str:
    """`refused`, and the tree under tmp_path exactly as it was before the run."""
    before = tree(tmp_path)
    line = refused(capsys, args, *fragments)
    assert_untouched(tmp_path, before)
    return line


@pytest.fixture
def no_work(monkeypatch):
    """Building a model or decoding an image fails the test: what it guards is refused before either."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the refusal: a model was built or an image decoded")

    from fxq.cli import commands, options
    from fxq.data import images

    for module in (options, commands):
        monkeypatch.setattr(module, "load_model", forbidden)
    monkeypatch.setattr(images, "_decode_all", forbidden)


# --- images ------------------------------------------------------------------------------------------------------


def _png_bytes(mode="RGB", size=(32, 32), value=None) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode) if value is None else Image.new(mode, size, value)
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bad_image(folder: Path, kind: str) -> None:
    p = folder / "img_001.png"
    if kind == "truncated png":
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "truncated jpeg":
        p.unlink()
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="JPEG")
        (folder / "img_001.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    elif kind == "text named png":
        p.write_text("this is not an image\n")
    elif kind == "empty file":
        p.write_bytes(b"")
    elif kind == "folder named png":
        p.unlink()
        p.mkdir()
    elif kind == "fifo named png":
        p.unlink()
        os.mkfifo(p)
    elif kind == "broken symlink":
        p.unlink()
        p.symlink_to(folder / "missing.png")
    elif kind == "random bytes":
        p.write_bytes(os.urandom(300))
    elif kind == "jpeg bytes in a bmp name":
        (folder / "img_001.bmp").write_bytes(b"BM" + os.urandom(100))
        p.unlink()


IMAGE_CASES = {
    "truncated png": "cannot decode",
    "truncated jpeg": "cannot decode",
    "text named png": "cannot decode",
    "empty file": "cannot decode",
    "folder named png": "not a regular file",
    "fifo named png": "not a regular file",
    "broken symlink": "not a regular file",
    "random bytes": "cannot decode",
    "jpeg bytes in a bmp name": "cannot decode",
}


@pytest.mark.parametrize("kind", list(IMAGE_CASES))
def test_bad_calibration_image_is_refused_by_name(tmp_path, sets, capsys, kind):
    calib, val = sets
    _bad_image(calib, kind)
    refused_cleanly(tmp_path, capsys, quantize_args(calib, val, tmp_path / "out"), IMAGE_CASES[kind], "img_001")


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "a file, not a folder"])
def test_missing_or_empty_image_source(tmp_path, sets, capsys, case):
    calib, val = sets
    src = {"missing folder": tmp_path / "nope", "empty folder": tmp_path / "empty", "a file, not a folder": None}[case]
    if case == "empty folder":
        src.mkdir()
    if src is None:
        src = calib / "img_000.png"
    before = tree(tmp_path)
    refused(capsys, quantize_args(src, val, tmp_path / "out"), str(src.name))
    assert_untouched(tmp_path, before)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, sets, capsys):
    calib, val = sets
    Image.new("1", (12_000, 8_000)).save(calib / "img_001.png")  # 96 MP, a few KB on disk
    before = tree(tmp_path)
    refused(capsys, quantize_args(calib, val, tmp_path / "out"), "decompression bomb", "img_001", "12000 x 8000")
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize(
    "mode,value,grey",
    [
        ("I;16", 65535, 255),
        ("I;16", 257 * 77, 77),
        ("L", 128, 128),
        ("LA", (90, 10), 90),
    ],
)
def test_16_bit_and_grey_images_decode_without_clipping(tmp_path, mode, value, grey):
    """16-bit greyscale scales to 8 bits (PIL's own convert would clip 16-bit values at 255)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new(mode, (32, 32), value).save(folder / "a.png")
    x = load_images(folder, Preprocess(resize=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1)), progress=False).x
    assert torch.allclose(x, torch.full_like(x, grey / 255), atol=0.5 / 255), (mode, float(x.mean()) * 255)


def test_32_bit_and_float_images_scale_and_refuse_nan():
    from fxq.data.images import to_rgb

    assert np.asarray(to_rgb(Image.new("I", (4, 4), 65535)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("I", (4, 4), 200)))[0, 0].tolist() == [200, 200, 200]
    assert np.asarray(to_rgb(Image.new("F", (4, 4), 0.5)))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"))


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "1", "P"])
def test_other_modes_decode(tmp_path, mode):
    folder = tmp_path / "imgs"
    folder.mkdir()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert(mode)
    img.save(folder / ("a.jpg" if mode == "CMYK" else "a.png"))
    assert load_images(folder, CIFAR_PREPROCESS, progress=False).x.shape == (1, 3, 32, 32)


# --- .npz image sets ---------------------------------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _good_arrays(n=4):
    blobs = [_png_bytes() for _ in range(n)]
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    return {"jpeg_bytes": data, "offsets": offsets, "labels": np.arange(n) % 10}


NPZ_CASES = {
    "random bytes": (None, "cannot read"),
    "missing arrays": ({"jpeg_bytes": np.zeros(3, np.uint8)}, "lacks the arrays"),
    "float labels": ("labels_float", "integer class indices"),
    "2-d labels": ("labels_2d", "1-d array"),
    "negative label": ("labels_negative", "negative class index"),
    "offsets falling": ("offsets_falling", "offsets must rise"),
    "corrupt image": ("corrupt_image", "cannot decode image 1"),
    "npy named npz": ("npy", "one array"),
    "labels too few": ("labels_short", "3 labels for 4 images"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_malformed_npz_set(tmp_path, sets, capsys, case):
    _, val = sets
    how, fragment = NPZ_CASES[case]
    path = tmp_path / "set.npz"
    a = _good_arrays()
    if how is None:
        path.write_bytes(os.urandom(500))
    elif isinstance(how, dict):
        _npz(path, **how)
    elif how == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(4))
    else:
        if how == "labels_float":
            a["labels"] = a["labels"].astype(np.float32)
        elif how == "labels_2d":
            a["labels"] = a["labels"].reshape(2, 2)
        elif how == "labels_negative":
            a["labels"][1] = -3
        elif how == "offsets_falling":
            a["offsets"][2] = a["offsets"][1] - 1
        elif how == "corrupt_image":
            a["jpeg_bytes"] = a["jpeg_bytes"].copy()
            a["jpeg_bytes"][a["offsets"][1] : a["offsets"][1] + 40] = 0
        elif how == "labels_short":
            a["labels"] = a["labels"][:3]
        _npz(path, **a)
    before = tree(tmp_path)
    refused(capsys, quantize_args(path, val, tmp_path / "out"), fragment, "set.npz")
    assert_untouched(tmp_path, before)


# --- label files -------------------------------------------------------------------------------------------------


def _labels(folder: Path, kind: str) -> None:
    p = folder / "labels.tsv"
    rows = p.read_text().splitlines()
    if kind == "latin-1":
        p.write_bytes("\n".join(rows).replace("img_000", "imgé_000").encode("latin-1"))
    elif kind == "duplicate row":
        p.write_text("\n".join(rows + [rows[0]]) + "\n")
    elif kind == "no tab":
        p.write_text("\n".join(rows[:2] + [rows[2].replace("\t", " ")] + rows[3:]) + "\n")
    elif kind == "negative class":
        p.write_text("\n".join(rows[:-1] + [rows[-1].split("\t")[0] + "\t-1"]) + "\n")
    elif kind == "class name":
        p.write_text("\n".join(rows[:-1] + [rows[-1].split("\t")[0] + "\tcat"]) + "\n")
    elif kind == "missing file listed":
        p.write_text("\n".join(rows + ["ghost.png\t3"]) + "\n")
    elif kind == "image not listed":
        p.write_text("\n".join(rows[:-1]) + "\n")
    elif kind == "empty":
        p.write_text("")
    elif kind == "a folder":
        p.unlink()
        p.mkdir()
    elif kind == "absent":
        p.unlink()
    elif kind == "class beyond the model":
        p.write_text("\n".join(rows[:-1] + [rows[-1].split("\t")[0] + "\t57"]) + "\n")


LABEL_CASES = {
    "latin-1": "not utf-8",
    "duplicate row": "listed twice",
    "no tab": "labels.tsv:3",
    "negative class": "labels.tsv:6",
    "class name": "labels.tsv:6",
    "missing file listed": "ghost.png",
    "image not listed": "not in its labels.tsv",
    "empty": "lists no images",
    "a folder": "not a regular file",
    "absent": "has no labels.tsv",
    "class beyond the model": "10 outputs",
}


@pytest.mark.parametrize("kind", list(LABEL_CASES))
def test_bad_label_file(tmp_path, sets, capsys, kind):
    calib, val = sets
    _labels(val, kind)
    refused_cleanly(tmp_path, capsys, quantize_args(calib, val, tmp_path / "out"), LABEL_CASES[kind])


@pytest.mark.parametrize("variant", ["bom", "crlf"])
def test_label_files_with_bom_or_crlf_read_the_same(tmp_path, variant):
    folder = write_images(tmp_path / "v", 3, size=(32, 32))
    plain = read_labels(folder)
    text = (folder / "labels.tsv").read_text()
    raw = ("\ufeff" + text).encode() if variant == "bom" else text.replace("\n", "\r\n").encode()
    (folder / "labels.tsv").write_bytes(raw)
    assert read_labels(folder) == plain


# --- weights and checkpoints -------------------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _weights_file(path: Path, kind: str) -> Path:
    real = load_model("cifar10_resnet20", random_weights=True).model.state_dict()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        torch.save(real, buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle with code":
        path.write_bytes(pickle.dumps({"x": _Boom()}))
    elif kind == "other model":
        torch.save(load_model("cifar10_resnet32", random_weights=True).model.state_dict(), path)
    elif kind == "json":
        path.write_text(json.dumps({"conv1.weight": [1, 2]}))
    elif kind == "a folder":
        path.mkdir()
    return path


WEIGHT_CASES = {
    "empty": "cannot read weights file",
    "truncated": "cannot read weights file",
    "random": "cannot read weights file",
    "pickle with code": "cannot read weights file",
    "other model": "does not match",
    "json": "cannot read weights file",
    "a folder": "does not exist",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", list(WEIGHT_CASES))
def test_bad_weights_file(tmp_path, sets, capsys, kind, monkeypatch):
    calib, val = sets
    monkeypatch.chdir(tmp_path)
    w = tmp_path / "w.th"
    if kind != "missing":
        _weights_file(w, kind)
    before = tree(tmp_path)
    args = quantize_args(calib, val, tmp_path / "out", "--weights", str(w))
    args.remove("--random-weights")
    refused(capsys, args, WEIGHT_CASES[kind], "w.th")
    assert_untouched(tmp_path, before)
    assert not (tmp_path / "PWNED").exists()


CHECKPOINT_CASES = {
    "no checkpoint": (None, "no checkpoint"),
    "empty": (b"", "damaged"),
    # seeded random bytes on which torch's weights-only unpickler raises UnpicklingError, IndexError, KeyError
    # and UnicodeDecodeError
    **{f"random bytes {seed}": (seed, "damaged") for seed in (0, 2, 20, 195)},
    "truncated": ("truncated", "damaged"),
    "pickle with code": ("pickle", "damaged"),
    "not fxq's": ("foreign", "not an fxq checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused_before_any_work(tmp_path, sets, capsys, case, monkeypatch, no_work):
    calib, val = sets
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    ck.mkdir()
    how, fragment = CHECKPOINT_CASES[case]
    path = ck / "rounding.pt"
    if how == b"":
        path.write_bytes(b"")
    elif isinstance(how, int):
        path.write_bytes(random.Random(how).randbytes(2048))
    elif how == "truncated":
        save_checkpoint(ck, "rounding.pt", {"fingerprint": {}, "step": 1, "v": torch.randn(1000)})
        path.write_bytes(path.read_bytes()[:300])
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"fingerprint": _Boom(), "step": 1}))
    elif how == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    before = tree(tmp_path)
    args = quantize_args(calib, val, tmp_path / "out", "--method", "eptq", "--checkpoint-dir", str(ck), "--resume")
    refused(capsys, args, fragment, "rounding.pt")
    assert_untouched(tmp_path, before)
    assert not (tmp_path / "PWNED").exists()


EPTQ = ["--method", "eptq", "--iterations", "4", "--rounding-batch", "2", "--lfh-probes", "1", "--no-eval"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """One short EPTQ run that left its checkpoint, to resume with one thing changed at a time."""
    base = tmp_path_factory.mktemp("resume")
    calib = write_images(base / "calib", 4, size=(32, 32), labels=False)
    other = write_images(base / "other", 4, size=(32, 32), labels=False)
    (other / "img_000.png").write_bytes(_png_bytes(value=(9, 9, 9), mode="RGB"))
    ck = base / "ck"
    args = ["quantize", *MODEL, "--calib", str(calib), "--batch-size", "2", "--out", str(base / "q"), *EPTQ]
    assert main([*args, "--checkpoint-dir", str(ck)]) == 0
    weights = base / "w.th"
    sd = load_model("cifar10_resnet20", random_weights=True).model.state_dict()
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}, weights)
    return base, calib, other, ck, args, weights


RESUME_CASES = {
    "act bits": (["--act-bits", "6"], "act_bits"),
    "iterations": (["--iterations", "6"], "iterations"),
    "no bias training": (["--no-bias-training"], "train_bias"),
    "batch size": (["--rounding-batch", "4"], "batch_size"),
    "loss weights": (["--loss-weights", "mean"], "loss_weights"),
    "weight bits": (["--weight-bits", "4"], "weight_bits"),
    "calibration images": ("other", "calibration_images"),
    "model weights": ("weights", "model_weights"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refuses_a_checkpoint_of_another_run_naming_the_field(checkpointed, capsys, case, tmp_path):
    base, calib, other, ck, args, weights = checkpointed
    change, field = RESUME_CASES[case]
    args = [a if a != str(base / "q") else str(tmp_path / "q") for a in args]
    if change == "other":
        args = [a if a != str(calib) else str(other) for a in args]
    elif change == "weights":
        args = [a for a in args if a != "--random-weights"] + ["--weights", str(weights)]
    else:
        args = args + change
    before = tree(tmp_path)
    refused(capsys, [*args, "--checkpoint-dir", str(ck), "--resume"], field, "different run")
    assert_untouched(tmp_path, before)


def test_resume_with_the_same_settings_is_accepted(checkpointed, capsys, tmp_path):
    _, _, _, ck, args, _ = checkpointed
    out = tmp_path / "q"
    args = [a if not a.endswith("/q") else str(out) for a in args]
    assert main([*args, "--checkpoint-dir", str(ck), "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["rounding"]["resumed_at"] == 4


def test_checkpoint_fingerprint_names_each_differing_field(tmp_path):
    save_checkpoint(tmp_path, "c.pt", {"fingerprint": {"a": 1, "b": "x", "c": [1, 2]}, "step": 3})
    with pytest.raises(CheckpointError, match=r"b: checkpoint 'x', this run 'y'.*c: checkpoint \[1, 2\], this run"):
        load_checkpoint(tmp_path, "c.pt", {"a": 1, "b": "y", "c": [1, 3]})
    assert load_checkpoint(tmp_path, "c.pt", {"a": 1, "b": "x", "c": [1, 2]})["step"] == 3


# --- output paths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["existing file", "non-empty folder", "under a file", "name too long"])
def test_bad_output_folder_is_refused_before_any_work(tmp_path, sets, capsys, case, no_work):
    calib, val = sets
    out = {
        "existing file": tmp_path / "out.txt",
        "non-empty folder": tmp_path / "full",
        "under a file": tmp_path / "out.txt" / "q",
        "name too long": tmp_path / ("q" * 300),
    }[case]
    (tmp_path / "out.txt").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.md").write_text("keep me too")
    before = tree(tmp_path)
    fragment = {"existing file": "is a file", "non-empty folder": "--force", "under a file": "is a file"}
    refused(capsys, quantize_args(calib, val, out), fragment.get(case, "too long"))
    assert_untouched(tmp_path, before)
    assert (tmp_path / "full" / "notes.md").read_text() == "keep me too"


def test_force_replaces_a_folder_whole(tmp_path, sets, capsys):
    calib, val = sets
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert main([*quantize_args(calib, val, out), "--force", "--no-eval"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "report.json", "tensors.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the model and the report get the same mode


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder no write lands in: a read-only tmpfs when running as root (which ignores mode bits), else 0o555."""
    d = tmp_path / "ro"
    d.mkdir()
    if IS_ROOT:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        yield d
        subprocess.run(["umount", str(d)])
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def test_read_only_output_is_refused_before_any_work(readonly_dir, sets, capsys):
    calib, val = sets
    refused(capsys, quantize_args(calib, val, readonly_dir / "q"), "ro")
    assert list(readonly_dir.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only); the result does not fit in it."""
    d = tmp_path / "disk"
    d.mkdir()
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield d
    subprocess.run(["umount", str(d)])


def test_full_disk_leaves_no_partial_folder(tiny_disk, sets, capsys):
    calib, val = sets
    (tiny_disk / "q").mkdir()
    (tiny_disk / "q" / "old.txt").write_text("the earlier result")
    line = refused(capsys, [*quantize_args(calib, val, tiny_disk / "q"), "--force", "--no-eval"], "disk is full")
    assert str(tiny_disk / "q") in line
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["q"]  # no temporary folder
    assert [p.name for p in (tiny_disk / "q").iterdir()] == ["old.txt"]  # the old result untouched


@pytest.mark.parametrize("where", ["tensors", "report"])
def test_injected_disk_full_leaves_no_partial_folder(tmp_path, sets, capsys, monkeypatch, where):
    """The same on any machine: an OSError(ENOSPC) injected into the writes of the result folder."""
    import errno

    calib, val = sets
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    if where == "tensors":
        monkeypatch.setattr(
            Path,
            "write_bytes",
            lambda self, *a, **k: full(self) if self.name == "tensors.pt" else real_bytes(self, *a, **k),
        )
    else:
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: full(self) if self.name == "report.json" else real_text(self, *a, **k),
        )
    before = tree(tmp_path)
    refused(capsys, [*quantize_args(calib, val, tmp_path / "q"), "--no-eval"], "disk is full", "q")
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("case", ["existing folder", "existing file", "report is a folder"])
def test_export_output_refused_before_any_work(tmp_path, capsys, case, saved_folder):
    out = tmp_path / "m.onnx"
    if case == "existing folder":
        out.mkdir()
    elif case == "existing file":
        out.write_text("old")
    else:
        Path(f"{out}.json").mkdir()
    before = tree(tmp_path)
    refused(capsys, ["export", "--model", str(saved_folder), "--out", str(out), "--quiet"], "m.onnx")
    assert_untouched(tmp_path, before)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("saved")
    calib = write_images(base / "calib", 4, size=(32, 32), labels=False)
    assert (
        main(["quantize", *MODEL, "--calib", str(calib), "--batch-size", "2", "--no-eval", "--out", str(base / "q")])
        == 0
    )
    return base / "q"


def test_export_into_a_missing_folder_creates_it(tmp_path, capsys, saved_folder):
    calib = write_images(tmp_path / "calib", 4, size=(32, 32), labels=False)
    out = tmp_path / "new" / "deeper" / "m.pt2"
    code = main(["export", "--model", str(saved_folder), "--format", "pt2", "--out", str(out), "--calib", str(calib)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and Path(f"{out}.json").is_file()


@pytest.mark.parametrize("case", ["not a folder of fxq", "a file", "legacy pickle"])
def test_eval_of_a_folder_that_is_not_fxqs(tmp_path, sets, capsys, case):
    _, val = sets
    m = tmp_path / "m"
    if case == "a file":
        m.write_text("x")
    else:
        m.mkdir()
        if case == "legacy pickle":
            (m / "model.pt").write_bytes(pickle.dumps({"x": _Boom()}))
    line = refused(capsys, ["eval", "--model", str(m), "--val", str(val), "--quiet"], "m")
    assert not (tmp_path / "PWNED").exists() and "Traceback" not in line


def test_eval_without_report_reads_the_preprocessing_from_the_model_file(saved_folder, capsys, tmp_path):
    """A CIFAR folder whose report.json is gone still evaluates at 32 px on CIFAR images, not ImageNet's 224."""
    copy = tmp_path / "q"
    shutil.copytree(saved_folder, copy)
    (copy / "report.json").unlink()
    val = write_images(tmp_path / "val", 4, size=(32, 32))
    assert main(["eval", "--model", str(copy), "--val", str(val), "--quiet"]) == 0
    assert "on 4 images" in capsys.readouterr().out
    assert fxq.load(copy).preprocess.crop == 32


# --- numbers -----------------------------------------------------------------------------------------------------

NUMBER_CASES = [
    (["--num-calib", "0"], "--num-calib"),
    (["--num-calib", "-5"], "--num-calib"),
    (["--num-calib", "abc"], "--num-calib"),
    (["--num-val", "0"], "--num-val"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--iterations", "-1"], "--iterations"),
    (["--rounding-images", "0"], "--rounding-images"),
    (["--lfh-probes", "0"], "--lfh-probes"),
    (["--mp-images", "0"], "--mp-images"),
    (["--act-bits", "1"], "act_bits"),
    (["--weight-bits", "99"], "99"),
    (["--avg-bits", "-1"], "--avg-bits"),
    (["--avg-bits", "nan"], "--avg-bits"),
    (["--bit-options", "4,0"], "--bit-options"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--time-budget", "15parsecs"], "--time-budget"),
    (["--time-budget", "0m"], "--time-budget"),
]


@pytest.mark.parametrize("extra,fragment", NUMBER_CASES, ids=[" ".join(c[0]) for c in NUMBER_CASES])
def test_bad_numbers_are_refused_not_reinterpreted(tmp_path, sets, capsys, extra, fragment):
    calib, val = sets
    before = tree(tmp_path)
    refused(capsys, [*quantize_args(calib, val, tmp_path / "out"), *extra], fragment)
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["lfh", "--rel-tol", "0"], "--rel-tol"),
        (["bench", "--batch-sizes", "1,0"], "--batch-sizes"),
        (["export", "--model", "x", "--out", "y", "--check-images", "0"], "--check-images"),
    ],
)
def test_bad_numbers_in_other_commands(capsys, args, fragment):
    refused(capsys, args, fragment)


def test_api_refuses_bad_counts():
    with pytest.raises(ConfigError, match="count >= 1"):
        Subset(0)
    with pytest.raises(ConfigError, match="images must be >= 1"):
        fxq.RoundingConfig(images=0)
    with pytest.raises(ConfigError):
        load_images(".", CIFAR_PREPROCESS, subset=-3)


# --- subsets -----------------------------------------------------------------------------------------------------


def test_a_subset_of_a_class_sorted_set_covers_the_classes():
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as the shared CIFAR files are
    idx, said = choose(1000, Subset(32), labels)
    assert len(idx) == 32 and len(set(labels[idx].tolist())) == 10 and "stratified" in said
    assert (idx == choose(1000, Subset(32), labels)[0]).all()  # seeded: the same on every run
    assert not (idx == choose(1000, Subset(32, seed=1), labels)[0]).all()
    first, said = choose(1000, Subset(32, first=True), labels)
    assert first.tolist() == list(range(32)) and "first 32" in said
    assert choose(1000, Subset(5000), labels)[1] == "all 1000 images"


def test_cifar_num_calib_32_covers_several_classes(capsys, tmp_path):
    calib = fxq.data.images.default_data_dir() / "cifar10" / "cifar10_train_calib1000_jpeg.npz"
    if not calib.is_file():
        pytest.skip("the shared CIFAR-10 set is not here")
    s = load_npz_images(calib, CIFAR_PREPROCESS, Subset(32), progress=False)
    labels = np.load(calib)["labels"]
    assert len(set(labels[:32].tolist())) == 1  # the first 32 are one class
    assert len(set(s.y.tolist())) == 10 and "stratified over 10 of 10 classes" in s.chosen


def test_report_says_how_the_images_were_drawn(tmp_path, sets, capsys):
    calib, val = sets
    out = tmp_path / "q"
    assert main([*quantize_args(calib, val, out), "--num-calib", "2", "--num-val", "3"]) == 0
    images = json.loads((out / "report.json").read_text())["images"]
    assert images["calibration"] == "2 of 4 images drawn at random (seed 0)"
    assert images["val"].startswith("3 of 6 images drawn at random (seed 0), stratified")


# --- the export front-end ----------------------------------------------------------------------------------------


def test_export_frontend_saves_and_reloads(tmp_path, sets, capsys):
    calib, val = sets
    out = tmp_path / "q"
    assert main([*quantize_args(calib, val, out), "--frontend", "export"]) == 0
    report = json.loads((out / "report.json").read_text())
    saved = fxq.load(out)
    x = torch.randn(3, 3, 32, 32)
    assert saved.model(x).shape == (3, 10)
    code = main(["eval", "--model", str(out), "--val", str(val), "--quiet"])
    assert code == 0 and f"top-1 {report['accuracy']['quantized']['top1']:6.2f}" in capsys.readouterr().out


# --- library writers ---------------------------------------------------------------------------------------------


def test_result_folder_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "r"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), result_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("fails half-way")
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    with result_folder(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_atomic_json_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "r.json"
    write_json_atomic(path, {"v": 1})

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match="disk is full"):
        write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_output_checks_in_the_api(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(OutputError, match="not empty"):
        check_output_folder(tmp_path / "d")
    assert check_output_folder(tmp_path / "d", force=True) == tmp_path / "d"
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path / "d")
    with pytest.raises(OutputError, match="exists"):
        check_output_file(tmp_path / "f")
    with pytest.raises(DataError):
        load_images(tmp_path / "d", CIFAR_PREPROCESS, progress=False)
    with pytest.raises(ModelError, match="holds no model.json"):
        fxq.load(tmp_path / "d")


# --- signals -----------------------------------------------------------------------------------------------------


# `python -m fxq` with Python's Ctrl-C handler even when this suite runs with SIGINT ignored (a shell's background
# job inherits that, and Python keeps an ignored SIGINT ignored), so that the SIGINT tests test fxq
_FXQ_WITH_SIGINT = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('fxq', run_name='__main__', alter_sys=True)"
)


def _cli(args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _FXQ_WITH_SIGINT, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `proc` writes `path` (it checkpoints within its first steps); a process that ends first fails the test
    with its output. No clock: a slow machine only waits longer."""
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)


LONG_EPTQ = ["--method", "eptq", "--iterations", "400", "--rounding-batch", "2", "--lfh-probes", "1", "--no-eval"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_nothing_and_hints_at_resume(tmp_path, sig, code):
    calib = write_images(tmp_path / "calib", 4, size=(32, 32), labels=False)
    ck, out = tmp_path / "ck", tmp_path / "q"
    args = ["quantize", *MODEL, "--calib", str(calib), "--batch-size", "2", "--out", str(out), *LONG_EPTQ]
    proc = _cli([*args, "--checkpoint-dir", str(ck), "--checkpoint-every", "5"])
    _wait_for(ck / "rounding.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("rounding", "\r"))]
    assert lines[-1].startswith("fxq: ") and "--resume" in lines[-1] and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib", "ck"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    calib = write_images(tmp_path / "calib", 4, size=(32, 32), labels=False)
    common = ["quantize", *MODEL, "--calib", str(calib), "--batch-size", "2", "--method", "eptq"]
    common += ["--iterations", "60", "--rounding-batch", "2", "--lfh-probes", "1", "--no-eval"]
    ck = tmp_path / "ck"
    proc = _cli([*common, "--out", str(tmp_path / "a"), "--checkpoint-dir", str(ck), "--checkpoint-every", "10"])
    _wait_for(ck / "rounding.pt", proc)
    proc.kill()
    proc.communicate()
    assert not (tmp_path / "a").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "fxq", *common, "--out", str(tmp_path / "a"), "--checkpoint-dir", str(ck), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(
        [sys.executable, "-m", "fxq", *common, "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    a = torch.load(tmp_path / "a" / "tensors.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "b" / "tensors.pt", weights_only=True)["state"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["rounding"]["resumed_at"] > 0
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from fxq.cli import commands

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "eval", broken)
    assert main(["eval", "--model", "cifar10_resnet20", "--random-weights"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "bug in fxq" in err.splitlines()[-1]


def test_an_os_error_outside_fxqs_writers_is_one_line(monkeypatch, capsys):
    import errno

    from fxq.cli import commands

    def unplugged(args):
        raise OSError(errno.EIO, "Input/output error", "/mnt/share/x")

    monkeypatch.setitem(commands.COMMANDS, "eval", unplugged)
    refused(capsys, ["eval", "--model", "cifar10_resnet20", "--random-weights"], "/mnt/share/x", "input/output error")

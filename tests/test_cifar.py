import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import fx
from torchvision.transforms import functional as TF

import fxq
from fxq.data.cifar import cifar_resnet
from fxq.data.evaluate import evaluate, kl_per_image, log_probs
from fxq.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    batches,
    default_data_dir,
    load_images,
    load_npz_images,
)
from fxq.data.models import CIFAR_MODELS, CIFAR_PREPROCESS, cifar_weights_path, known_models, load_model
from fxq.data.subset import Subset
from fxq.errors import DataError, ModelError
from tests.conftest import seeded, sqnr_db

CIFAR10 = default_data_dir() / "cifar10"
TEST_SET = CIFAR10 / "cifar10_test10k_jpeg.npz"
CALIB_SET = CIFAR10 / "cifar10_train_calib1000_jpeg.npz"
needs_cifar = pytest.mark.skipif(
    not (TEST_SET.exists() and CALIB_SET.exists() and (CIFAR10 / "models").is_dir()),
    reason=f"shared CIFAR-10 data not found under {CIFAR10} (set FXQ_DATA to the folder holding cifar10/)",
)


def write_npz(path, n=4, size=32, **override):
    """An .npz image set laid out like the shared CIFAR-10 ones, from seeded random pixels."""
    g = torch.Generator().manual_seed(0)
    bufs, imgs = [], []
    for _ in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        out = io.BytesIO()
        Image.fromarray(arr).save(out, format="PNG")  # lossless: the decoded pixels are known exactly
        bufs.append(np.frombuffer(out.getvalue(), np.uint8))
        imgs.append(arr)
    arrays = {
        "jpeg_bytes": np.concatenate(bufs),
        "offsets": np.cumsum([0] + [len(b) for b in bufs]).astype(np.int64),
        "labels": (np.arange(n) % 10).astype(np.uint8),
        "names": np.array([f"img/{i:04d}.png" for i in range(n)]),
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path, imgs


# --- model -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, blocks", [(20, 3), (32, 5)])
def test_cifar_resnet_traces_with_fx(depth, blocks):
    model = cifar_resnet(depth).eval()
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [blocks] * 3
    gm = fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.nn.functional.pad) == 2  # option-A shortcuts at the first block of layers 2 and 3
    x = seeded(2, 3, 32, 32)
    out = gm(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_cifar_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ModelError, match="depth must be 6n \\+ 2 with n >= 1 .* got 21"):
        cifar_resnet(21)


def test_cifar_models_are_known():
    assert set(CIFAR_MODELS) <= set(known_models())


def test_cifar_preprocess_keeps_32px_images_exact():
    arr = (seeded(32, 32, 3) * 40 + 128).clamp(0, 255).to(torch.uint8).numpy()
    x = CIFAR_PREPROCESS(Image.fromarray(arr))
    ref = TF.normalize(torch.from_numpy(arr).permute(2, 0, 1).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)  # no resampling, no crop


def test_missing_cifar_weights_name_path_and_fix(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"cifar10_resnet20: weights file '.*none.th' does not exist; give it with"):
        load_model("cifar10_resnet20", weights=str(tmp_path / "none.th"))
    monkeypatch.setenv("FXQ_DATA", str(tmp_path))
    path = tmp_path / "cifar10" / "models" / "resnet32-d509ac18.th"
    assert cifar_weights_path("cifar10_resnet32") == path
    with pytest.raises(ModelError, match=r"resnet32-d509ac18.th' does not exist.* set FXQ_DATA"):
        load_model("cifar10_resnet32")


def test_random_weights_need_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQ_DATA", str(tmp_path))
    a, b = load_model("cifar10_resnet20", random_weights=True), load_model("cifar10_resnet20", random_weights=True)
    assert not a.model.training and a.preprocess == CIFAR_PREPROCESS
    torch.testing.assert_close(a.model.linear.weight, b.model.linear.weight, rtol=0, atol=0)  # seeded


def test_cifar_resnet_quantizes_at_w8a8():
    model = load_model("cifar10_resnet20", random_weights=True).model
    x = seeded(4, 3, 32, 32)
    qgm, _ = fxq.quantize(model, batches(x, 4), fxq.PTQConfig(progress=False))
    assert sqnr_db(model(x), qgm(x)) > 30  # 39.6 dB measured: the slice/pad shortcut passes through quantization


@needs_cifar
@pytest.mark.parametrize("name", list(CIFAR_MODELS))
def test_checkpoint_keys_match_the_model_exactly(name):
    ckpt = torch.load(cifar_weights_path(name), map_location="cpu", weights_only=True)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in ckpt.items()}
    model = cifar_resnet(CIFAR_MODELS[name][0])
    # the checkpoints predate BatchNorm's num_batches_tracked buffer; every other key matches one to one
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(own) == sorted(sd)
    model.load_state_dict(sd, strict=True)
    lm = load_model(name)
    assert not lm.model.training and lm.preprocess == CIFAR_PREPROCESS
    for k, v in sd.items():
        torch.testing.assert_close(lm.model.state_dict()[k], v, rtol=0, atol=0)


# --- npz image sets ---------------------------------------------------------------------------------------------


def test_npz_images_decode_with_labels_and_names(tmp_path):
    path, imgs = write_npz(tmp_path / "set.npz", n=5)
    s = load_npz_images(path, CIFAR_PREPROCESS, labeled=True, progress=False)
    assert s.x.shape == (5, 3, 32, 32) and s.y.dtype == torch.int64 and s.y.tolist() == [0, 1, 2, 3, 4]
    assert s.files[:2] == ["img/0000.png", "img/0001.png"]
    torch.testing.assert_close(s.x[3], CIFAR_PREPROCESS(Image.fromarray(imgs[3])), rtol=0, atol=0)
    assert len(load_npz_images(path, CIFAR_PREPROCESS, subset=2, progress=False)) == 2


def test_load_images_dispatches_npz_files(tmp_path):
    path, _ = write_npz(tmp_path / "set.npz", n=3)
    a = load_images(path, CIFAR_PREPROCESS, 2, labeled=True, progress=False)  # as the CLI calls it
    b = load_npz_images(path, CIFAR_PREPROCESS, 2, progress=False)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.y.tolist() == [0, 1]


def test_npz_without_labels(tmp_path):
    path, _ = write_npz(tmp_path / "set.npz", n=2, labels=None, names=None)
    s = load_npz_images(path, CIFAR_PREPROCESS, progress=False)
    assert s.y is None and s.files == ["00000", "00001"]
    with pytest.raises(DataError, match="has no labels array; evaluation needs labels"):
        load_npz_images(path, CIFAR_PREPROCESS, labeled=True, progress=False)


def test_missing_npz(tmp_path):
    with pytest.raises(
        DataError, match=r"image set '.*nope.npz' does not exist or is not a file; pass an existing .npz file"
    ):
        load_images(tmp_path / "nope.npz", Preprocess(), progress=False)


def test_corrupt_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"cannot read '.*bad.npz' as an .npz image set: .*replace the file"):
        load_npz_images(tmp_path / "bad.npz", CIFAR_PREPROCESS, progress=False)


def test_npz_without_image_arrays(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match=r"lacks the arrays \['jpeg_bytes', 'offsets'\]"):
        load_npz_images(tmp_path / "other.npz", CIFAR_PREPROCESS, progress=False)


def test_npz_with_bad_offsets(tmp_path):
    path, _ = write_npz(tmp_path / "set.npz", n=3, offsets=np.array([0, 10, 5, 10**9]))
    with pytest.raises(DataError, match="offsets must rise from 0 to at most len"):
        load_npz_images(path, CIFAR_PREPROCESS, progress=False)


def test_npz_with_a_corrupt_image_names_it(tmp_path):
    path, _ = write_npz(tmp_path / "set.npz", n=3)
    with np.load(path) as z:
        arrays = dict(z)
    a, b = arrays["offsets"][1:3]
    arrays["jpeg_bytes"][a + 8 : b] = 0  # keep the PNG signature, wipe the rest
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"cannot decode image 1 \('img/0001.png'\) of '.*set.npz'.*replace it"):
        load_npz_images(path, CIFAR_PREPROCESS, progress=False)


@needs_cifar
@pytest.mark.parametrize("path", [TEST_SET, CALIB_SET], ids=["test", "calib"])
def test_shared_cifar_sets_decode(path):
    with np.load(path) as z:
        n, labels = len(z["offsets"]) - 1, z["labels"]
    assert n == (10_000 if path == TEST_SET else 1_000)
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).tolist() == [n // 10] * 10
    s = load_images(path, CIFAR_PREPROCESS, Subset(16, first=True), labeled=True, progress=False)
    assert s.x.shape == (16, 3, 32, 32) and s.y.shape == (16,) and s.y.tolist() == labels[:16].tolist()
    assert s.files[0] == "airplane/0000.jpg"


@pytest.mark.slow
@needs_cifar
def test_resnet20_float_top1_on_real_images():
    # the set is sorted by class, so take every 5th image (200 per class), not the first 2000 (2 classes only:
    # 76.15 %). Every 5th gives 80.45 %; all 10,000 give 81.03 % (8103 correct), as the README says.
    lm = load_model("cifar10_resnet20")
    val = load_images(TEST_SET, lm.preprocess, labeled=True, progress=False)
    acc = evaluate(lm.model, val.x[::5], val.y[::5], batch_size=200, progress=False)
    assert acc["images"] == 2000
    assert abs(acc["top1"] - 81.03) < 2


def test_evaluate_refuses_labels_the_model_cannot_output():
    # ImageNet labels (up to 999) scored against a 10-class model would quietly give ~0 %
    model = load_model("cifar10_resnet20", random_weights=True).model
    x, y = seeded(4, 3, 32, 32), torch.tensor([3, 7, 999, 1])
    with pytest.raises(DataError, match=r"from 1 to 999 but the model has 10 outputs.*--val"):
        evaluate(model, x, y, progress=False)
    assert evaluate(model, x, y.clamp(max=9), progress=False)["images"] == 4


def test_evaluate_against_a_reference_gives_the_kl_and_the_top1_agreement():
    model = torch.nn.Linear(6, 4)
    x, y = seeded(9, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    ref = log_probs(model, x, batch_size=4)
    same = evaluate(model, x, y, batch_size=4, progress=False, reference=ref)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-7)
    other = torch.nn.Linear(6, 4)
    got = evaluate(other, x, y, batch_size=4, progress=False, reference=ref)
    p, q = ref.exp(), other(x).detach().softmax(1)
    assert got["kl"] == pytest.approx(float((p * (p / q).log()).sum(1).mean()), rel=1e-5)  # batches of 4 add up
    assert got["agreement"] == pytest.approx(float((q.argmax(1) == p.argmax(1)).float().mean()))
    assert "kl" not in evaluate(other, x, y, progress=False)
    each = kl_per_image(log_probs(other, x), ref)
    assert each.shape == (9,) and each.min() >= 0
    torch.testing.assert_close(each, (p * (p / q).log()).sum(1), rtol=1e-5, atol=1e-7)
    per_image = evaluate(other, x, y, batch_size=4, progress=False, reference=ref, per_image=True)
    assert per_image["top1_images"] == q.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor(per_image["kl_images"], dtype=torch.float64), each.double())
    assert "kl_images" not in evaluate(other, x, y, progress=False, per_image=True)


@needs_cifar
def test_cli_takes_the_cifar_sets_for_a_cifar_model(tmp_path, capsys):
    from fxq.cli.commands import main
    from fxq.cli.options import fill_image_sets
    from fxq.cli.parser import build_parser

    out = tmp_path / "r20"
    args = ["quantize", "--model", "cifar10_resnet20", "--num-calib", "64", "--num-val", "100"]
    assert main([*args, "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calib_images"] == 64 and report["accuracy"]["float"]["images"] == 100
    lm = load_model("cifar10_resnet20")
    val = load_images(TEST_SET, lm.preprocess, 100, labeled=True, progress=False)
    assert report["accuracy"]["float"]["correct1"] == evaluate(lm.model, val.x, val.y, progress=False)["correct1"]
    # a quantized folder's report names its model; the default model is Lite0
    for argv, expect in ((["eval", "--model", str(out)], TEST_SET), (["lfh"], default_data_dir() / "imagenet" / "val")):
        ns = build_parser().parse_args(argv)
        fill_image_sets(ns)
        assert ns.val == str(expect)
    ns = build_parser().parse_args(["quantize", "--model", "cifar10_resnet32", "--calib", "mine", "--out", "o"])
    fill_image_sets(ns)
    assert (ns.calib, ns.val) == ("mine", str(TEST_SET))  # what the user gives stays

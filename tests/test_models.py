import pytest
import torch
import torchvision

from fxq.data.models import LITE_PREPROCESS, load_model, load_state_dict_file
from fxq.errors import ModelError


def test_unknown_model_name():
    with pytest.raises(ModelError, match=r"unknown model 'resnet1'; use efficientnet_lite0, a torchvision"):
        load_model("resnet1")


def test_torchvision_model_needs_weights():
    with pytest.raises(ModelError, match="give its weights with --weights FILE"):
        load_model("resnet18")


def test_weights_file_round_trip(tmp_path):
    src = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    lm = load_model("resnet18", weights=str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[k], v, rtol=0, atol=0)
    assert not lm.model.training


def test_weights_file_that_does_not_match(tmp_path):
    path = tmp_path / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(
        ModelError, match=r"does not match ResNet: \d+ missing keys .* check that the file was saved from this model"
    ):
        load_state_dict_file(torchvision.models.resnet18(), path)


def test_weights_file_with_wrong_shapes(tmp_path):
    path = tmp_path / "r18_10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(ModelError, match=r"2 shape mismatches \['fc.weight: file \(10, 512\) vs model \(1000, 512\)'"):
        load_state_dict_file(torchvision.models.resnet18(), path)


def test_missing_and_corrupt_weights_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict_file(torchvision.models.resnet18(), tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_state_dict_file(torchvision.models.resnet18(), tmp_path / "bad.pth")


def test_efficientnet_lite0_has_its_real_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    lm = load_model("efficientnet_lite0")
    assert lm.preprocess == LITE_PREPROCESS
    n = sum(p.numel() for p in lm.model.parameters())
    assert 4.6e6 < n < 4.7e6  # 4.65 M parameters
    # trained weights, not an init: BN running variances are far from their initial 1
    var = torch.cat([m.running_var for m in lm.model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert (var - 1).abs().mean() > 0.1

"""Saved quantized models (fxq.save / fxq.load): the same numbers back, no code run from the files, whole folders."""

import json
import os

import pytest
import torch

import fxq
from fxq.config import LFHConfig, Method, MixedPrecisionConfig, PTQConfig, RoundingConfig
from fxq.errors import CheckpointError, ModelError, OutputError
from fxq.io import artifact
from fxq.io.checkpoint import load_checkpoint, save_checkpoint
from fxq.ir.meta import q
from fxq.quant.modules import ActQuant, QuantWeight
from tests.conftest import TinyNet, randomize_bn_, seeded

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(2)]
LFH = LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8)


def _net():
    torch.manual_seed(0)
    return randomize_bn_(TinyNet()).eval()


CONFIGS = {
    "rtn_w8": PTQConfig(progress=False),
    "rtn_w4": PTQConfig(target=fxq.INT8.with_bits(4), progress=False),
    "eptq": PTQConfig(
        target=fxq.INT8.with_bits(4),
        method=Method.EPTQ,
        rounding=RoundingConfig(iterations=4, batch_size=4),
        lfh=LFH,
        progress=False,
    ),
    "mp": PTQConfig(
        mixed_precision=MixedPrecisionConfig(avg_bits=4.0, images=8, batch_size=8, check_images=8),
        lfh=LFH,
        progress=False,
    ),
}


class _Payload:
    """A pickle that writes a file when it is loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_saved_model_loads_back_to_the_same_numbers(tmp_path, name):
    qgm, report = fxq.quantize(_net(), CALIB, CONFIGS[name])
    fxq.save(qgm, tmp_path / "m", report=report)
    loaded = fxq.load(tmp_path / "m", model=TinyNet())  # the architecture only: its weights are thrown away
    x = seeded(6, 3, 16, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), qgm(x))
    for (n1, m1), (n2, m2) in zip(qgm.named_modules(), loaded.model.named_modules()):
        assert n1 == n2 and type(m1).__name__ == type(m2).__name__
        if isinstance(m1, QuantWeight):
            assert m1.spec == m2.spec and torch.equal(m1.hard_codes(), m2.hard_codes())
        if isinstance(m1, ActQuant):
            assert m1.spec == m2.spec and torch.equal(m1.scale, m2.scale)
    bias_bits = {n.name: q(n).bias_bits for n in qgm.graph.nodes}
    assert {n.name: q(n).bias_bits for n in loaded.model.graph.nodes} == bias_bits
    assert loaded.report["method"] == report.method and sorted(os.listdir(tmp_path / "m")) == sorted(
        [artifact.MODEL_FILE, artifact.TENSORS_FILE, artifact.REPORT_FILE]
    )


def test_a_loaded_model_exports_like_the_original(tmp_path):
    pytest.importorskip("onnxruntime")
    qgm, _ = fxq.quantize(_net(), CALIB, CONFIGS["rtn_w4"])
    fxq.save(qgm, tmp_path / "m")
    loaded = fxq.load(tmp_path / "m", model=TinyNet()).model
    for gm, out in ((qgm, "a.onnx"), (loaded, "b.onnx")):
        fxq.export_onnx(gm, (seeded(1, 3, 16, 16),), tmp_path / out)
    import onnx

    a, b = (onnx.load(str(tmp_path / f)) for f in ("a.onnx", "b.onnx"))
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    qgm, _ = fxq.quantize(_net(), CALIB, CONFIGS["rtn_w8"])
    folder = fxq.save(qgm, tmp_path / "m")
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "payload": _Payload(str(marker))}, folder / artifact.TENSORS_FILE)
    with pytest.raises(ModelError, match="not a file of plain tensors.*fxq loads no code from files"):
        fxq.load(folder, model=TinyNet())
    assert not marker.exists()


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": {}, "payload": _Payload(str(marker))}, tmp_path / "rounding.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of plain tensors"):
        load_checkpoint(tmp_path, "rounding.pt", {})
    assert not marker.exists()
    save_checkpoint(tmp_path, "ok.pt", {"fingerprint": {"a": 1}, "step": 3, "v": torch.ones(2), "history": [(0, 1.0)]})
    assert load_checkpoint(tmp_path, "ok.pt", {"a": 1})["step"] == 3


def test_an_earlier_pickled_folder_gets_a_clear_error(tmp_path):
    (tmp_path / "old").mkdir()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "old" / "model.pt")
    with pytest.raises(ModelError, match="holds a model.pt, a pickle an earlier fxq wrote; fxq does not load pickles"):
        fxq.load(tmp_path / "old")


def test_saving_replaces_the_folder_whole(tmp_path, monkeypatch):
    qgm, _ = fxq.quantize(_net(), CALIB, CONFIGS["rtn_w8"])
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier run")
    fxq.save(qgm, folder)
    assert not (folder / "stale.txt").exists()  # nothing of the earlier run is left beside the new files
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fxq.save(qgm, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old folder, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_what_cannot_be_rebuilt_is_refused_when_saving(tmp_path):
    cfg = PTQConfig(leaf_modules=(torch.nn.Linear,), progress=False)
    qgm, _ = fxq.quantize(_net(), CALIB, cfg)
    with pytest.raises(ModelError, match="leaf_modules given as classes cannot be written down"):
        fxq.save(qgm, tmp_path / "m")
    (tmp_path / "file").write_text("x")
    qgm, _ = fxq.quantize(_net(), CALIB, CONFIGS["rtn_w8"])
    with pytest.raises(OutputError, match="is a file; give a folder"):
        fxq.save(qgm, tmp_path / "file")
    with pytest.raises(ModelError, match="names no model fxq can build; pass the float model"):
        fxq.save(qgm, tmp_path / "m") and fxq.load(tmp_path / "m")


def test_a_damaged_model_file_gets_a_clear_error(tmp_path):
    qgm, _ = fxq.quantize(_net(), CALIB, CONFIGS["rtn_w8"])
    folder = fxq.save(qgm, tmp_path / "m")
    meta = json.loads((folder / artifact.MODEL_FILE).read_text())
    (folder / artifact.MODEL_FILE).write_text(json.dumps({**meta, "format": "fxq-quantized/0"}))
    with pytest.raises(ModelError, match="is format 'fxq-quantized/0', this fxq reads"):
        fxq.load(folder, model=TinyNet())
    (folder / artifact.MODEL_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        fxq.load(folder, model=TinyNet())

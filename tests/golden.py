"""Fingerprints of quantized models, to pin a run's integer codes, scales, biases, widths and LFH values.

`tests/test_golden.py` compares today's runs against the fingerprints in tests/golden/, one record per machine
that recorded them. On a machine with a record (same torch, CPU capability, caches and thread count) every number
must be identical to it; on another machine float kernels sum in another order, so the comparison with the first
record allows what that changes (a code at a tie, a threshold one candidate away, and the rounding's trained
biases following such a threshold) and nothing more. FXQ_WRITE_GOLDEN=1 rewrites a file with this machine's
record alone, only when a change of numbers is intended (say why in the commit); FXQ_WRITE_GOLDEN=add adds this
machine's record beside the others, after it passed the comparison with the first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fxq.quant.modules import ActQuant, QuantWeight

GOLDEN_DIR = Path(__file__).parent / "golden"
WRITE = os.environ.get("FXQ_WRITE_GOLDEN")  # "1": rewrite; "add": add this machine


def machine_key() -> str:
    """What float results depend on: torch's build, the kernels the CPU selects, and how work is split."""
    caps = dict(getattr(torch.cpu, "get_capabilities", dict)())
    flags = ",".join(k for k in ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "amx_int8") if caps.get(k))
    cache = f"l1d={caps.get('l1d_cache_size')},l2={caps.get('l2_cache_size')}"
    return (
        f"torch {torch.__version__}; {torch.backends.cpu.get_cpu_capability()} [{flags}] {caps.get('cpu_name')} "
        f"{cache}; {torch.get_num_threads()} threads"
    )


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprint(qgm: torch.nn.Module) -> dict:
    """Per quantizer: width, integer codes (hash and histogram), scales and the bias the layer adds."""
    out = {}
    for name, m in qgm.named_modules():
        if isinstance(m, QuantWeight):
            codes = m.hard_codes().to(torch.int8)
            lo, hi = m.spec.qmin, m.spec.qmax
            bias = m.layer.bias
            out[name] = {
                "bits": m.spec.bits,
                "codes_sha": _sha(codes),
                "codes_hist": torch.bincount((codes.flatten().long() - lo), minlength=hi - lo + 1).tolist(),
                "scale": m.scale.float().tolist(),
                "bias": None if bias is None else bias.detach().float().tolist(),
            }
        elif isinstance(m, ActQuant):
            out[name] = {"bits": m.spec.bits, "signed": m.spec.signed, "scale": float(m.scale)}
    return out


def lfh_values(report) -> dict[str, float]:
    return {lr.node: lr.lfh for lr in report.layers if lr.interest and lr.lfh is not None}


def check(name: str, found: dict) -> None:
    """Compare `found` with tests/golden/NAME.json (or write it, FXQ_WRITE_GOLDEN)."""
    path = GOLDEN_DIR / f"{name}.json"
    here = {"machine": machine_key(), **found}
    if WRITE == "1":
        _write(path, [here])
        return
    records = json.loads(path.read_text())["records"]
    mine = [r for r in records if r["machine"] == here["machine"]]
    want = dict(mine[0] if mine else records[0])
    exact = bool(mine)
    want.pop("machine")
    assert want.keys() == found.keys(), f"{name}: sections {sorted(found)} != golden {sorted(want)}"
    for section, values in want.items():
        _compare(f"{name}/{section}", values, found[section], exact, trained=section.startswith("eptq"))
    if WRITE == "add" and not mine:
        _write(path, [*records, here])


def _write(path: Path, records: list[dict]) -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps({"records": records}, indent=1) + "\n")


def _compare(where: str, want, got, exact: bool, trained: bool) -> None:
    if exact:
        assert got == want, f"{where}: not bit-identical to the golden run ({_first_difference(want, got)})"
        return
    if all(isinstance(v, dict) for v in want.values()):
        _compare_quantizers(where, want, got, BIAS_TRAINED if trained else BIAS)
    else:  # LFH values or widths by layer
        _compare_values(where, want, got)


# on another machine, of the layer's largest bias: a bias set once (bias correction) moves with the sums it is
# made of; one the rounding trains follows its inputs, so an activation threshold one candidate away upstream
# (1.2 % of its step) moved a trained bias by 3.3 % between two of the project's machines (Xeon, EPYC)
BIAS, BIAS_TRAINED = 0.02, 0.06


def _close(a, b, rel: float) -> bool:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ta.shape == tb.shape and bool(((ta - tb).abs() <= rel * ta.abs().max().clamp_min(1e-12)).all())


def _compare_quantizers(where: str, want: dict, got: dict, bias_rel: float) -> None:
    """Another machine: widths equal, scales within 2 % of the layer's largest and biases within `bias_rel`,
    codes' histogram within 2 % of the code count (float sums in another order move codes at ties and thresholds
    by one candidate)."""
    assert want.keys() == got.keys(), f"{where}: quantizers differ"
    for layer, w in want.items():
        g = got[layer]
        assert g["bits"] == w["bits"], f"{where}/{layer}: {g['bits']} bits, golden {w['bits']}"
        assert _close(w["scale"], g["scale"], 0.02), f"{where}/{layer}: scales moved"
        if "codes_hist" in w:
            hw, hg = torch.tensor(w["codes_hist"]), torch.tensor(g["codes_hist"])
            assert (hw - hg).abs().sum() <= 0.02 * hw.sum(), f"{where}/{layer}: codes moved"
            assert (w["bias"] is None) == (g["bias"] is None) and (
                w["bias"] is None or _close(w["bias"], g["bias"], bias_rel)
            ), f"{where}/{layer}: biases moved"


def _compare_values(where: str, want: dict, got: dict) -> None:
    assert want.keys() == got.keys(), f"{where}: keys differ"
    for k, w in want.items():
        assert abs(got[k] - w) <= 0.05 * abs(w) + 1e-12, f"{where}/{k}: {got[k]} vs golden {w}"


def _first_difference(want, got, path: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in want.keys() | got.keys():
            if want.get(k) != got.get(k):
                return _first_difference(want.get(k), got.get(k), f"{path}/{k}")
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        return f"{path}[{i}]: {got[i]!r} vs golden {want[i]!r}"
    return f"{path}: {str(got)[:80]} vs golden {str(want)[:80]}"

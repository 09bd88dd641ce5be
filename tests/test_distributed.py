"""Data-parallel runs (torch.distributed, gloo on the CPU, 2 processes) against one process on the same images:
calibration, RTN codes, LFH traces, mixed-precision sensitivities and rounding steps; a rank killed mid-way and the
run resumed with one rank."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fxq
from fxq.config import LFHConfig, Method, MixedPrecisionConfig, PTQConfig, RoundingConfig, WeightError
from fxq.data.evaluate import evaluate, log_probs
from fxq.dist import World
from fxq.ir.meta import q
from fxq.kernels.lfh_reduce import RunningStats, merge_stats, welford_update_
from fxq.mp.sensitivity import weight_layers
from fxq.quant.modules import ActQuant, QuantWeight
from tests.conftest import TinyNet, randomize_bn_, seeded, write_images

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]
LFH = LFHConfig(min_probes=3, max_probes=5, images=16, batch_size=16, seed=1)


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn_(TinyNet()).eval()


def _entry(rank: int, size: int, folder: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=size)
    try:
        out = fn(rank, *args)
    except Exception:
        out = {"error": traceback.format_exc()}
    torch.save(out, f"{folder}/result{rank}.pt")
    dist.destroy_process_group()


def _spawn(fn, size: int, folder: Path, *args) -> tuple[list[dict | None], list[int]]:
    """fn(rank, *args) in `size` processes of one gloo group: each rank's returned dict (None when the process
    died before it returned) and exit codes. Every process runs to its end, whatever another one does."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, size, str(folder), fn, args)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    results = []
    for r in range(size):
        path = folder / f"result{r}.pt"
        results.append(torch.load(path, weights_only=True) if path.exists() else None)
    return results, [p.exitcode for p in procs]


def _quantizers(qgm) -> dict:
    out = {}
    for name, m in qgm.named_modules():
        if isinstance(m, QuantWeight):
            out[name] = {"codes": m.hard_codes(), "scale": m.scale.detach().clone(), "bias": m.ensure_bias().detach()}
        elif isinstance(m, ActQuant):
            out[name] = {"scale": m.scale.detach().clone(), "signed": torch.tensor(m.spec.signed)}
    return out


def _eptq(folder: str, **rounding) -> PTQConfig:
    settings = {"iterations": 2, "batch_size": 8, "warmup": 0.0, "keep_best": False, "checkpoint_every": 1}
    return PTQConfig(
        target=fxq.INT8.with_bits(4),
        method=Method.EPTQ,
        lfh=LFH,
        rounding=RoundingConfig(**{**settings, "checkpoint_dir": folder, **rounding}),
        progress=False,
    )


def _stages(rank: int, folder: str) -> dict:
    """Every stage that reads images, as one process or as one rank of several."""
    model, out = _tiny(), {"world": [World.current().rank, World.current().size]}
    rtn = PTQConfig(target=fxq.INT8.with_bits(4), weight_error=WeightError.OUTPUT, progress=False)
    out["rtn"] = _quantizers(fxq.quantize(model, CALIB, rtn).model)
    _, report = fxq.label_free_hessian(model, CALIB, LFH, PTQConfig(progress=False))
    out["lfh"] = {lr.node: torch.tensor([lr.lfh, lr.lfh_stderr]) for lr in report.layers if lr.interest}
    mp = PTQConfig(mixed_precision=MixedPrecisionConfig(avg_bits=4, images=16, batch_size=8), lfh=LFH, progress=False)
    gm = fxq.analyze(model, CALIB, mp)
    out["sensitivity"] = {n.name: q(n).sensitivity for n in weight_layers(gm)}
    out["bits"] = {n.name: q(n).wspec.bits for n in weight_layers(gm)}
    x, y = torch.cat(CALIB[:2])[:13], torch.arange(13) % 5  # 13 images: parts of 7 and 6
    reference = log_probs(_tiny(seed=1), x)
    out["eval"] = evaluate(
        model, x, y, batch_size=4, progress=False, world=World.current(), reference=reference, per_image=True
    )
    for name, cache, start in (
        ("cached", "on", "float"),
        ("recomputed", "off", "float"),
        ("layerwise", "on", "layerwise"),
    ):
        ckpt = f"{folder}/{name}{rank}"  # each rank its own folder: rank 0 alone may write there
        fxq.quantize(model, CALIB, _eptq(ckpt, teacher_cache=cache, start=start))
        out[name] = torch.load(f"{ckpt}/rounding.pt", weights_only=True) if Path(ckpt, "rounding.pt").exists() else {}
        out[name + "_wrote"] = Path(ckpt).exists()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    """The stages once in one process, once with 2 ranks (rank 0's result; rank 1's is checked to match it)."""
    folder = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: float kernels split work by thread, and sum in that order
    try:
        one = _stages(0, str(folder / "one"))
    finally:
        torch.set_num_threads(threads)
    results, codes = _spawn(_stages, 2, folder, str(folder / "two"))
    assert codes == [0, 0], [r and r.get("error") for r in results]
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    return one, results


def test_the_ranks_see_their_world(two_ranks):
    _, ranks = two_ranks
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]


def test_thresholds_and_rtn_codes_of_two_ranks_equal_one_process(two_ranks):
    one, ranks = two_ranks
    for r in ranks:
        assert one["rtn"].keys() == r["rtn"].keys()
        for name, want in one["rtn"].items():
            for key in ("codes", "scale", "signed"):
                if key in want:  # bit for bit: min/max and the samples merge exactly, the sums are float64
                    assert torch.equal(want[key], r["rtn"][name][key]), f"{name}.{key}"
            if "bias" in want:  # bias correction: the mean, summed in another order
                torch.testing.assert_close(r["rtn"][name]["bias"], want["bias"], rtol=1e-6, atol=1e-7)


def test_per_image_evaluation_of_two_ranks_equals_one_process(two_ranks):
    one, ranks = two_ranks
    want = one["eval"]
    assert len(want["kl_images"]) == len(want["top1_images"]) == 13
    assert sum(want["kl_images"]) / 13 == pytest.approx(want["kl"], rel=1e-6)
    for r in ranks:  # each rank holds every image's values, in the images' order
        got = r["eval"]
        assert got["top1_images"] == want["top1_images"] and got["correct1"] == want["correct1"]
        assert got["kl_images"] == pytest.approx(want["kl_images"], rel=1e-5, abs=1e-7)


def test_lfh_traces_of_two_ranks_equal_one_process(two_ranks):
    one, ranks = two_ranks
    for r in ranks:
        assert one["lfh"].keys() == r["lfh"].keys() and len(one["lfh"]) >= 2
        for node, want in one["lfh"].items():
            torch.testing.assert_close(r["lfh"][node], want, rtol=1e-5, atol=0)


def test_sensitivities_of_two_ranks_equal_one_process(two_ranks):
    one, ranks = two_ranks
    for r in ranks:
        assert r["bits"] == one["bits"]
        for node, measures in one["sensitivity"].items():
            for measure, per_width in measures.items():
                for bits, value in per_width.items():  # each measured whole by one rank: nearly bit for bit
                    assert r["sensitivity"][node][measure][bits] == pytest.approx(value, rel=1e-5)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("run", ["cached", "recomputed"])
def test_two_rounding_steps_on_two_ranks_equal_one_process_at_the_whole_batch(two_ranks, run):
    one, ranks = two_ranks
    want, got = one[run], ranks[0][run]
    assert want["step"] == got["step"] == 2
    for key, value in want["soft"].items():  # V, biases: 2 ranks x 4 images = 1 process x 8 images
        assert _relative_gap(got["soft"][key], value) < 1e-6, key
    moments = want["opt_v"]["state"][0]
    for key in ("exp_avg", "exp_avg_sq"):
        assert _relative_gap(got["opt_v"]["state"][0][key], moments[key]) < 1e-5, key
    assert not ranks[1][run + "_wrote"]  # rank 1 never writes


def test_the_layerwise_start_on_two_ranks_chooses_as_one_process(two_ranks):
    one, ranks = two_ranks
    v1, v2 = one["layerwise"]["soft"]["v"], ranks[0]["layerwise"]["soft"]["v"]
    assert float(((v1 >= 0) == (v2 >= 0)).float().mean()) > 0.999
    assert _relative_gap(v2, v1) < 1e-3


def test_welford_states_merge_exactly():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(3, 40, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [10.0], [1e-3]])
    whole = RunningStats.zeros(3)
    welford_update_(whole, values)
    parts = [RunningStats.zeros(3) for _ in range(3)]
    for p, cols in zip(parts, (values[:, :7], values[:, 7:20], values[:, 20:])):
        welford_update_(p, cols)
    merged = merge_stats([*parts, RunningStats.zeros(3)])  # an empty part adds nothing
    for a, b in zip((merged.count, merged.mean, merged.m2), (whole.count, whole.mean, whole.m2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_world_parts_cover_a_batch_in_order():
    for size in (1, 2, 3, 5):
        for n in (5, 8, 13):
            rows = [i for r in range(size) for i in range(n)[World(r, size).part(n)]]
            assert rows == list(range(n))
            assert (
                max(len(range(n)[World(r, size).part(n)]) for r in range(size))
                - min(len(range(n)[World(r, size).part(n)]) for r in range(size))
                <= 1
            )


def _killed(rank: int, folder: str) -> dict:
    """An 8-step rounding on 2 ranks whose rank 1 dies at step 5 (after the checkpoint at step 4)."""
    import fxq.eptq.train as train

    real = train.batch_indices

    def dies_at_step_5(n, batch, step, seed):
        if rank == 1 and step == 5:
            os._exit(9)
        return real(n, batch, step, seed)

    train.batch_indices = dies_at_step_5
    try:
        fxq.quantize(_tiny(), CALIB, _eptq(folder, iterations=8, checkpoint_every=2))
    except fxq.FxqError as e:
        return {"error_type": type(e).__name__, "message": str(e)}
    return {"message": "finished"}


def test_a_rank_killed_mid_way_then_resumed_with_one_rank_ends_at_the_one_process_result(tmp_path):
    ckpt = tmp_path / "ckpt"
    results, codes = _spawn(_killed, 2, tmp_path, str(ckpt))
    assert codes[1] == 9 and results[1] is None
    assert results[0]["error_type"] == "RankLost", results[0]
    assert "rank 0 of 2" in results[0]["message"] and "--resume" in results[0]["message"]
    assert torch.load(ckpt / "rounding.pt", weights_only=True)["step"] == 4  # the last checkpoint is intact

    resumed, report = fxq.quantize(_tiny(), CALIB, _eptq(str(ckpt), iterations=8, checkpoint_every=2, resume=True))
    assert report.rounding["resumed_at"] == 4
    straight, _ = fxq.quantize(_tiny(), CALIB, _eptq(str(tmp_path / "straight"), iterations=8, checkpoint_every=2))
    a = torch.load(ckpt / "rounding.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "rounding.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in b["soft"]:
        assert _relative_gap(a["soft"][key], b["soft"][key]) < 1e-5, key
    decided = b["soft"]["v"].abs() > 1e-3  # codes follow the sign of V: equal wherever V is not at 0
    assert bool(((a["soft"]["v"] >= 0) == (b["soft"]["v"] >= 0))[decided].all())
    for m1, m2 in zip(resumed.modules(), straight.modules()):
        if isinstance(m1, QuantWeight):
            assert float((m1.hard_codes() == m2.hard_codes()).float().mean()) > 0.999


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxq", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def cli_images(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    return write_images(folder / "calib", 24, labels=False), write_images(folder / "val", 12)


def _quantize_args(calib: Path, val: Path, out: Path, *more: str) -> list[str]:
    return [
        "quantize",
        "--model",
        "mobilenet_v3_small",
        "--random-weights",
        "--calib",
        str(calib),
        "--val",
        str(val),
        "--batch-size",
        "4",
        "--weight-bits",
        "4",
        "--out",
        str(out),
        "--quiet",
        *more,
    ]


def test_the_cli_runs_on_two_processes_and_rank_0_alone_writes(tmp_path, cli_images):
    calib, val = cli_images
    two = _cli(_quantize_args(calib, val, tmp_path / "two", "--nproc", "2"))
    assert two.returncode == 0, two.stderr
    one = _cli(_quantize_args(calib, val, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    r1, r2 = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("one", "two"))
    assert (r1["settings"]["ranks"], r2["settings"]["ranks"]) == (1, 2)
    assert r2["accuracy"]["quantized"]["images"] == 12 and r2["calib_images"] == 24  # the counts of all ranks
    t1, t2 = ([lr["act_threshold"] or 0.0 for lr in r["layers"]] for r in (r1, r2))
    assert t2 == pytest.approx(t1, rel=1e-4) and any(t1)  # 1 thread per rank against 2: the last bits
    assert two.stdout.count("wrote ") == 1  # one rank speaks


def test_a_rank_killed_under_the_cli_is_named_and_the_run_resumes_with_one_process(tmp_path, cli_images):
    calib, val = cli_images
    ckpt = tmp_path / "ckpt"
    args = _quantize_args(calib, val, tmp_path / "out", "--method", "eptq", "--iterations", "60")
    args += ["--rounding-batch", "4", "--lfh-probes", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    run = subprocess.Popen([sys.executable, "-m", "fxq", *args, "--nproc", "2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "rounding.pt").exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        os.kill(_rank_pid(run.pid, 1), signal.SIGKILL)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 2
    assert "fxq: error: rank 1 of 2 was stopped by SIGKILL" in err and "--resume" in err
    assert not (tmp_path / "out").exists()  # nothing partial
    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rounding"]["resumed_at"] >= 5 and report["rounding"]["iterations"] == 60


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the process of `rank` among the launcher `parent`'s descendants (from /proc)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                f"RANK={rank}".encode() in env
                and b"TORCHELASTIC_RUN_ID" in b"\0".join(env)
                and _descends(int(proc.name), parent)
            ):
                return int(proc.name)
    raise AssertionError(f"no process of rank {rank} under {parent}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _uneven(rank: int, folder: str) -> dict:
    """Three ranks over splits that do not divide: 5 calibration batches, an LFH batch of 16, rounding batches of
    8 (3 + 3 + 2), a teacher cache of 40 images."""
    calib = [seeded(8, 3, 16, 16, seed=i) for i in range(5)]
    model, out = _tiny(), {}
    out["rtn"] = _quantizers(fxq.quantize(model, calib, PTQConfig(target=fxq.INT8.with_bits(4), progress=False)).model)
    _, report = fxq.label_free_hessian(model, calib, LFH, PTQConfig(progress=False))
    out["lfh"] = {lr.node: torch.tensor([lr.lfh, lr.lfh_stderr]) for lr in report.layers if lr.interest}
    ckpt = f"{folder}/r{rank}"
    fxq.quantize(model, calib, _eptq(ckpt, teacher_cache="on"))
    out["rounding"] = torch.load(f"{ckpt}/rounding.pt", weights_only=True) if Path(ckpt).exists() else {}
    return out


def test_three_ranks_over_uneven_splits_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _uneven(0, str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    ranks, codes = _spawn(_uneven, 3, tmp_path, str(tmp_path / "three"))
    assert codes == [0, 0, 0], [r and r.get("error") for r in ranks]
    got = ranks[0]
    for name, want in one["rtn"].items():
        for key in ("codes", "scale"):
            if key in want:
                assert torch.equal(want[key], got["rtn"][name][key]), f"{name}.{key}"
    for node, want in one["lfh"].items():
        torch.testing.assert_close(got["lfh"][node], want, rtol=1e-5, atol=0)
    for key, value in one["rounding"]["soft"].items():
        assert _relative_gap(got["rounding"]["soft"][key], value) < 1e-6, key
    assert ranks[1]["rounding"] == ranks[2]["rounding"] == {}  # only rank 0 writes

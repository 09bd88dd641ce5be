"""The export check (fxq.backends.check): what counts as a tie, and what as another function."""

import pytest
import torch

import fxq
from fxq.backends.check import CheckLimits, check_lowered, compare_outputs, output_step
from tests.conftest import seeded


def test_a_class_the_reference_scores_within_a_step_of_its_best_is_a_tie():
    ref = torch.tensor([[3.0, 2.0, 0.0], [5.0, 1.0, 0.0], [2.0, 2.0, 1.0]])  # step 1
    got = torch.tensor([[2.0, 3.0, 0.0], [5.0, 1.0, 0.0], [2.0, 2.0, 1.0]])  # row 0: the runner-up, a step below
    steps, same, within = compare_outputs(ref, got, 1.0, tie_steps=1.0)
    assert (steps.max, same, within) == (1.0, pytest.approx(2 / 3), 1.0)
    got[1] = torch.tensor([0.0, 6.0, 0.0])  # row 1: a class the reference puts 4 steps below its best
    steps, same, within = compare_outputs(ref, got, 1.0, tie_steps=1.0)
    assert (steps.max, same, within) == (5.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert compare_outputs(ref[:, :1], got[:, :1], 1.0, 1.0)[1:] == (None, None)  # no class scores: no agreement


def test_the_check_tells_a_tie_from_another_function(tiny_net):
    calib = [seeded(8, 3, 16, 16, seed=i) for i in range(2)]
    qgm = fxq.quantize(tiny_net, calib, fxq.PTQConfig(progress=False)).model
    x, step = seeded(16, 3, 16, 16, seed=5), output_step(qgm)
    exact = check_lowered(qgm, qgm, x, "reference")
    assert exact.passed and exact.enforced and exact.max_abs_steps == 0 and exact.top1_within_ties == 1.0
    assert exact.images == 16 and exact.output_step == step
    shifted = check_lowered(qgm, lambda inp: qgm(inp) + 9 * step, x, "shifted")  # every output 9 steps off
    assert not shifted.passed and shifted.max_abs_steps == pytest.approx(9, rel=1e-4)
    with pytest.raises(fxq.DataError, match="no inputs given"):
        check_lowered(qgm, qgm, x[:0], "empty")
    assert check_lowered(qgm, qgm, x, "few", CheckLimits(images=3)).images == 3

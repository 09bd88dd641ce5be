"""The packed distillation loss against the per-tensor formula."""

import pytest
import torch

from fxq.eptq.distillation import (
    Workspace,
    column_lengths,
    distillation_loss,
    pack,
    packed_loss,
    row_energies,
    softmax_kl,
)
from tests.conftest import seeded


def _per_sample(a: torch.Tensor) -> torch.Tensor:
    return a.square().flatten(1).sum(1).mean()


def test_distillation_loss_is_the_mean_weighted_per_sample_squared_error():
    zf = [seeded(4, 3, 5, 5, seed=1), seeded(4, 7, seed=2), seeded(2, 4, 6, seed=3)]  # the last: batch 2
    zq = [z + 0.1 * seeded(*z.shape, seed=9) for z in zf]
    w = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0]])
    for batch in (3, 2):  # one batch size (packed [B, D]), then mixed first dimensions
        f, q = zf[:batch] if batch == 3 else zf, zq[:batch] if batch == 3 else zq
        f, q = (zf[:2] + [zf[0] * 2], zq[:2] + [zq[0] * 2]) if batch == 3 else (f, q)
        for normalize in (True, False):
            q = [z.detach().clone().requires_grad_() for z in q]
            r = [z.detach().clone().requires_grad_() for z in q]
            terms = torch.stack([_per_sample(a - b) / (_per_sample(a) if normalize else 1) for a, b in zip(f, r)])
            got = distillation_loss(f, q, w, normalize)
            torch.testing.assert_close(got, (w * terms).mean(-1))
            torch.testing.assert_close(distillation_loss(f, q, w[0], normalize), got[0])
            got[0].backward()
            (w[0] * terms).mean().backward()
            for a, b in zip(q, r):  # the hand-written backward against autograd's of the formula
                torch.testing.assert_close(a.grad, b.grad)


def test_packing_channels_last_reads_memory_order_and_keeps_the_loss():
    zf = [seeded(3, 4, 5, 6, seed=1), seeded(3, 10, seed=2)]
    zq = [z + 0.1 * seeded(*z.shape, seed=5) for z in zf]
    nhwc = [z.contiguous(memory_format=torch.channels_last) if z.dim() == 4 else z for z in zq]
    packed = pack(nhwc, nhwc=True)
    assert packed.shape == (3, 4 * 5 * 6 + 10)
    assert torch.equal(packed[:, :120], nhwc[0].permute(0, 2, 3, 1).reshape(3, -1))
    w = torch.tensor([1.0, 3.0])
    lengths = column_lengths(zf)
    want = distillation_loss(zf, zq, w)
    workspace = Workspace()
    for _ in range(2):  # the second step reuses the first's buffer
        q = [z.clone().requires_grad_() for z in nhwc]
        loss = packed_loss(pack(zf, nhwc=True), q, lengths, w, nhwc=True, workspace=workspace)
        torch.testing.assert_close(loss, want)
        loss.backward()
        r = [z.clone().requires_grad_() for z in zq]
        distillation_loss(zf, r, w).backward()
        for a, b in zip(q, r):
            torch.testing.assert_close(a.grad, b.grad)
    first = packed_loss(pack(zf, nhwc=True), q, lengths, w, nhwc=True, workspace=workspace)
    packed_loss(pack(zf, nhwc=True), q, lengths, w, nhwc=True, workspace=workspace)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # its buffer was reused
        first.backward()


def test_cached_energies_and_low_precision_inputs_give_the_fp32_loss():
    zf = [seeded(4, 3, 5, 5, seed=1), seeded(4, 7, seed=2)]
    zq = [z + 0.1 * seeded(*z.shape, seed=9) for z in zf]
    w, lengths, pf = torch.tensor([1.0, 2.0]), column_lengths(zf), pack(zf)
    want = distillation_loss(zf, zq, w)
    energy = row_energies(pf, lengths)
    assert energy.shape == (4, 2)
    torch.testing.assert_close(energy[:, 1], zf[1].square().sum(1))
    torch.testing.assert_close(packed_loss(pf, zq, lengths, w, zf_energy=energy.mean(0)), want)
    q = [z.bfloat16().requires_grad_() for z in zq]  # an autocast student against an fp16 cache
    loss = packed_loss(pf.half(), q, lengths, w)
    assert loss.dtype == torch.float32 and abs(float(loss.detach()) / float(want) - 1) < 0.02
    loss.backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.shape == t.shape for t in q)


def test_a_tensor_folding_the_batch_into_its_first_dimension_counts_image_by_image():
    # windowed attention: (images x windows, tokens, channels), each image's windows together, beside an NCHW
    # tensor read channels-last; the packed loss is the loss of its (images, -1) view, and so are the gradients
    zf = [seeded(3, 4, 5, 6, seed=1), seeded(3 * 4, 7, 2, seed=2)]
    zq = [z + 0.1 * seeded(*z.shape, seed=5) for z in zf]
    nhwc = [zq[0].contiguous(memory_format=torch.channels_last), zq[1]]
    viewed = [zf[0], zf[1].reshape(3, -1)]
    w = torch.tensor([1.0, 3.0])
    lengths = column_lengths(zf, batch=3)
    assert lengths.tolist() == [120, 56]
    packed = pack(zf, nhwc=True, batch=3)
    assert torch.equal(packed[:, 120:], viewed[1])
    q = [z.clone().requires_grad_() for z in nhwc]
    loss = packed_loss(packed, q, lengths, w, nhwc=True, workspace=Workspace())
    r = [zq[0].clone().requires_grad_(), zq[1].reshape(3, -1).clone().requires_grad_()]
    want = distillation_loss(viewed, r, w)
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    torch.testing.assert_close(q[0].grad, r[0].grad)
    assert q[1].grad.shape == zq[1].shape
    torch.testing.assert_close(q[1].grad, r[1].grad.reshape(zq[1].shape))


def test_softmax_kl_is_the_mean_kl_of_the_softmaxes_with_the_difference_of_them_as_gradient():
    teacher = seeded(6, 5, seed=1).half()  # a teacher cache may hold fp16
    student = seeded(6, 5, seed=2).requires_grad_()
    p, q = teacher.float().softmax(1), student.softmax(1)
    got = softmax_kl(teacher, student)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum(1).mean())
    got.backward()
    torch.testing.assert_close(student.grad, (q - p).detach() / 6)  # d KL / d logits of each image, over B
    half = softmax_kl(teacher[:3], student[:3], samples=6) + softmax_kl(teacher[3:], student[3:], samples=6)
    torch.testing.assert_close(half, got)  # ranks' parts of one batch add up to the batch's
    assert float(softmax_kl(teacher, teacher.float())) == pytest.approx(0.0, abs=1e-6)

"""The packed distillation loss against the per-tensor formula."""

import torch

from fxq.distillation import column_lengths, distillation_loss, pack, packed_loss
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
            terms = torch.stack([_per_sample(a - b) / (_per_sample(a) if normalize else 1) for a, b in zip(f, q)])
            got = distillation_loss(f, q, w, normalize)
            torch.testing.assert_close(got, (w * terms).mean(-1))
            torch.testing.assert_close(distillation_loss(f, q, w[0], normalize), got[0])


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
    torch.testing.assert_close(packed_loss(pack(zf, nhwc=True), packed, lengths, w), want)
    q = [z.clone().requires_grad_() for z in nhwc]
    packed_loss(pack(zf, nhwc=True), pack(q, nhwc=True), lengths, w).backward()
    r = [z.clone().requires_grad_() for z in zq]
    distillation_loss(zf, r, w).backward()
    for a, b in zip(q, r):
        torch.testing.assert_close(a.grad, b.grad)

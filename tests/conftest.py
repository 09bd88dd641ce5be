import os
import tempfile
from pathlib import Path

# Inductor's cached CPU kernels built under one ISA fail under another, as when AVX2 is emulated on a VNNI machine
# (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): each emulated ISA gets its own cache, unless the caller names one. Set
# before torch is imported, which fixes the cache's folder.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        "torchinductor_fxq_"
        + "_".join(os.environ.get(k, "native").lower() for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")),
    ),
)

import pytest
import torch
from torch import nn

from fxq.data.images import default_data_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, groups=1, stride=1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyNet(nn.Module):
    """conv-bn-relu stem, a residual block (add), a concat, global pool and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn_a(self.conv_a(x)) + x
        y = torch.relu(y)
        z = torch.cat([y, self.branch(y)], dim=1)
        return self.head(z.mean((2, 3)))


def conv_stack() -> nn.Module:
    """conv/ReLU layers of 216, 576, 576 and 576 weights, global pool and a linear head of 40: balanced enough to
    cut into groups."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3, padding=1)] + [nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
    layers = [m for conv in convs for m in (conv, nn.ReLU())]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def room_for(model: nn.Module, share: float) -> int:
    """Free memory for `share` of the model's whole rounding state."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return int(share * weights * bytes_per_weight())


def bytes_per_weight() -> int:
    """The rounding's estimate per quantized weight under the memory policy in effect now."""
    from fxq.eptq.train import _BYTES_PER_WEIGHT
    from fxq.memory import keeps_freed_memory

    return _BYTES_PER_WEIGHT[keeps_freed_memory()]


def randomize_bn_(model: nn.Module) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return randomize_bn_(TinyNet()).eval()


IMAGENET = default_data_dir() / "imagenet"
needs_imagenet = pytest.mark.skipif(
    not (IMAGENET / "val" / "labels.tsv").exists(), reason="shared ImageNet images not found"
)


def write_images(folder: Path, n: int, size=(40, 48), labels=True) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
        lines.append(f"img_{i:03d}.png\t{i % 10}")
    if labels:
        (folder / "labels.tsv").write_text("\n".join(lines) + "\n")
    return folder

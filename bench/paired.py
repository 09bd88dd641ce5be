"""Two quantized models compared on the same val images, image by image: is one nearer the float model than the other?

    python bench/paired.py runs/a.json "layerwise W4A8 b8 budget 15m" runs/b.json "layerwise-apart W4A8 b8 budget 15m"
    python bench/paired.py runs/models/layerwise_W4A8_b8_budget_15m runs/b.json "layerwise-apart W4A8 b8 budget 15m"

Each side is a row of a bench/time_to_quality.py --json file (FILE ROW) or a folder fxq.save wrote (evaluated here
on its model's default val images). Both sides meet the same images, so the per-image differences give an interval
for the difference itself. Printed: each side's mean KL to float and top-1; the mean of the per-image KL
differences with its 95 % interval (normal); the images one side gets right and the other wrong, with the exact
two-sided sign test's p-value (McNemar's) of so lopsided a split if the two models were alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch

import fxq
from fxq.data.evaluate import evaluate, log_probs
from fxq.data.images import load_images
from fxq.data.models import default_image_sets, load_model


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact p-value of `wins` against `losses` under a fair coin."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@functools.cache
def float_and_val(model_name: str) -> tuple:
    """A model's float model and its default labeled val images, loaded once."""
    lm = load_model(model_name)
    return lm.model, load_images(default_image_sets(model_name)[1], lm.preprocess, labeled=True, progress=False)


@functools.cache
def reference(model_name: str) -> torch.Tensor:
    """The float model's log-probabilities on its val images, computed once."""
    model, val = float_and_val(model_name)
    return log_probs(model, val.x)


def side(spec: list[str]) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(name, per-image KL, per-image top-1 class, labels) of a json row (FILE ROW) or a saved folder (FOLDER)."""
    if len(spec) == 2:
        file, row = spec
        done = json.loads(Path(file).read_text())
        r = done["rows"].get(row, {})
        if "kl_images" not in r:
            with_them = [k for k, r in done["rows"].items() if "kl_images" in r]
            raise SystemExit(f"{file} has no row {row!r} with per-image results; rows with them: {with_them}")
        labels = float_and_val(done["setting"]["model"])[1].y
        return f"{Path(file).name}: {row}", torch.tensor(r["kl_images"]), torch.tensor(r["top1_images"]), labels
    (folder,) = spec
    saved = fxq.load(folder)
    if saved.model_name is None:
        raise SystemExit(f"{folder} names no model; compare rows of time_to_quality's --json instead")
    val = float_and_val(saved.model_name)[1]
    r = evaluate(saved.model, val.x, val.y, progress=False, reference=reference(saved.model_name), per_image=True)
    return Path(folder).name, torch.tensor(r["kl_images"]), torch.tensor(r["top1_images"]), val.y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sides", nargs="+", help="FILE ROW or FOLDER, twice")
    args = p.parse_args()
    specs, rest = [], list(args.sides)
    while rest:  # a folder stands alone; a json file takes the row after it
        take = 2 if rest[0].endswith(".json") else 1
        specs.append(rest[:take])
        rest = rest[take:]
    if len(specs) != 2:
        raise SystemExit("give two sides: FILE ROW or FOLDER each")
    (na, kla, pa, ya), (nb, klb, pb, yb) = (side(s) for s in specs)
    if len(kla) != len(klb) or not torch.equal(ya, yb):
        raise SystemExit(f"the sides were evaluated on other images ({len(kla)} and {len(klb)}): compare the same")
    d = (kla - klb).double()
    mean, half = float(d.mean()), 1.96 * float(d.std()) / math.sqrt(len(d))
    for name, kl, pred in ((na, kla, pa), (nb, klb, pb)):
        print(f"{name}\n    mean KL {float(kl.mean()):.4f}, top-1 {int((pred == ya).sum())} of {len(ya)}")
    print(
        f"KL difference (first - second): {mean:+.4f}, 95 % interval {mean - half:+.4f} to {mean + half:+.4f} "
        f"({mean / float(klb.mean()):+.1%} of the second's)"
    )
    ra, rb = pa == ya, pb == ya
    wins, losses = int((ra & ~rb).sum()), int((~ra & rb).sum())
    print(
        f"right in the first alone {wins}, in the second alone {losses}: sign test p = {sign_test(wins, losses):.2f}; "
        f"top-1 classes differ on {int((pa != pb).sum())} images"
    )


if __name__ == "__main__":
    main()

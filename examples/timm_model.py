"""A timm model: instrument it as timm builds it, train, fuse: timm's own class all the way.

    python examples/timm_model.py                       # resnet18 at 64x64, a few seconds
    python examples/timm_model.py --model efficientnet_b0 --steps 5

Random weights from timm's config: nothing is downloaded.
"""

import argparse

import timm
import torch
from torch import nn

import asr_fx


def main(name: str = "resnet18", steps: int = 2, size: int = 64) -> None:
    torch.manual_seed(0)
    # --8<-- [start:timm]
    model = timm.create_model(name, num_classes=10)  # train mode, as timm returns it
    x = torch.randn(2, 3, size, size)
    asr_model = asr_fx.instrument(model, example_inputs=(x,))  # no wrapper, no leaf list
    print(f"{name}: {len(asr_fx.get_config(asr_model)['sites'])} ASR sites")

    optimizer = torch.optim.AdamW(asr_model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(asr_model(torch.randn(4, 3, size, size)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    fused = asr_fx.fuse(asr_model.eval(), strict=True)
    assert type(fused) is type(model)  # timm's own class, with the trained and folded weights
    # --8<-- [end:timm]
    with torch.no_grad():
        error = (fused(x) - asr_model(x)).abs().max() / asr_model(x).abs().max()
    print(f"{type(fused).__name__} with the folded weights: max rel error {error:.1e}")
    assert error < 1e-4


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    main(args.model, args.steps, args.size)

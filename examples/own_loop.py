"""ASR in your own training loop: instrument, train, fuse, export, save.

    python examples/own_loop.py            # tiny synthetic data, a few seconds on a CPU
    python examples/own_loop.py --steps 50 --depth 20

The model is the built-in CIFAR ResNet; swap in your own. Nothing is downloaded.
"""

import argparse
from pathlib import Path

import torch
from torch import nn

import asr_fx
from asr_fx.models import cifar_resnet


def main(steps: int = 3, depth: int = 11, out: str = "asr-fx-example") -> None:
    torch.manual_seed(0)
    # --8<-- [start:loop]
    model = cifar_resnet(depth=depth, num_classes=10)
    asr_model = asr_fx.instrument(model, attention="se")  # a copy of your model, your class, with ASR blocks

    # psi and the attention networks are ordinary parameters: one optimizer, one weight decay
    optimizer = torch.optim.SGD(asr_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    asr_model.train()
    for _ in range(steps):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(asr_model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    asr_model.eval()
    fused = asr_fx.fuse(asr_model, strict=True)  # your class again: every block folded, the vanilla cost
    # --8<-- [end:loop]
    print(f"loss {loss.item():.3f}; parameters: vanilla {asr_fx.count_parameters(model):,}, "
          f"trained {asr_fx.count_parameters(asr_model):,}, fused {asr_fx.count_parameters(fused):,}")
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # --8<-- [start:export]
    x = torch.randn(1, 3, 32, 32)
    report = asr_fx.export_onnx(fused, folder / "model.onnx", x, reference=asr_model)  # verified in onnxruntime
    print(report.table())
    asr_fx.save(asr_model, folder / "asr_model.pt", factory="asr_fx.models:cifar_resnet",
                factory_kwargs={"depth": depth, "num_classes": 10})  # `asr-fx fuse` reads this back
    # --8<-- [end:export]
    print(f"wrote {folder / 'model.onnx'} and {folder / 'asr_model.pt'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--depth", type=int, default=11)
    parser.add_argument("-o", "--out", default="asr-fx-example", help="output folder (default ./asr-fx-example)")
    args = parser.parse_args()
    main(args.steps, args.depth, args.out)

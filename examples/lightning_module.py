"""PyTorch Lightning: the instrumented model inside a LightningModule, then fused after training.

    python examples/lightning_module.py      # the built-in CIFAR ResNet-11, 2 steps on random images

Synthetic data on the CPU: nothing is downloaded.
"""

import argparse
import tempfile

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import asr_fx
from asr_fx.models import cifar_resnet


# --8<-- [start:module]
class Classifier(pl.LightningModule):
    """A LightningModule holding the instrumented model: psi and the attention train with everything else."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.model(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
# --8<-- [end:module]


def main(steps: int = 2, out: str | None = None) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), batch_size=8)
    # --8<-- [start:train]
    module = Classifier(asr_fx.instrument(cifar_resnet(depth=11), attention="se"))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out or tempfile.mkdtemp(prefix="asr-fx-lightning-"))
    trainer.fit(module, data)

    fused = asr_fx.fuse(module.model.eval(), strict=True)  # the vanilla ResNet's cost
    # --8<-- [end:train]
    print(f"fused: {asr_fx.count_parameters(fused):,} parameters "
          f"(vanilla {asr_fx.count_parameters(cifar_resnet(depth=11)):,})")
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(cifar_resnet(depth=11))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("-o", "--out", default=None, help="Lightning's root folder (default: a temporary folder)")
    args = parser.parse_args()
    main(args.steps, args.out)

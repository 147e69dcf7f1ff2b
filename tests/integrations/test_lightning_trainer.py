"""PyTorch Lightning: a ``LightningModule`` holding the instrumented built-in CIFAR ResNet, trained by
``Trainer(max_steps=2)`` on CPU; its checkpoint (``model.``-prefixed keys) loads into a freshly instrumented
model, and the fused model is the vanilla ``CifarResNet`` computing what the trained one computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FUSE_RTOL,
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_vanilla_form,
    rel_err,
    without_asr,
)
from torch.utils.data import DataLoader, TensorDataset

import asr_fx
from asr_fx.foreign_checkpoints import load_checkpoint
from asr_fx.models import cifar_resnet

pl = pytest.importorskip("pytorch_lightning")


class Classifier(pl.LightningModule):
    """The user's LightningModule: any model, cross-entropy, SGD."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _vanilla(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet(depth=11, num_classes=4)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def test_lightning_trainer_two_steps_checkpoint_and_fuse(tmp_path, no_network):
    vanilla = _vanilla()
    model = asr_fx.instrument(vanilla)
    assert_own_model(model, vanilla)
    before = asr_values(model)
    module = Classifier(model)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=_data())
    assert trainer.global_step == 2 and module.model is model
    assert_asr_trained(before, model)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    reloaded = asr_fx.instrument(_vanilla(seed=1))  # different init: every weight comes from the checkpoint
    reloaded.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        want = model(x)
        assert torch.equal(reloaded(x), want)
        assert rel_err(want, without_asr(model, vanilla).eval()(x)) > 1e-3  # the trained blocks act
        fused = asr_fx.fuse(reloaded)
        assert_vanilla_form(fused, vanilla)
        assert rel_err(want, fused(x)) <= FUSE_RTOL

    # what `asr-fx fuse last.ckpt --model asr_fx.models:cifar_resnet` reads: the Lightning checkpoint as it is
    loaded = load_checkpoint(tmp_path / "last.ckpt", factory="asr_fx.models:cifar_resnet",
                             factory_kwargs={"depth": 11, "num_classes": 4})
    assert_own_model(loaded.model, vanilla)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), want)

"""Hugging Face: the instrumented model is the user's ``ResNetForImageClassification``, trained by
``transformers.Trainer`` with ``labels``, saved with ``save_model``, loaded back with ``from_pretrained`` +
``instrument``, fused to the vanilla class, and round-tripped through ``save_pretrained`` / ``from_pretrained``.

A tiny config (widths 8 and 16, one block per stage), random weights, 32x32 synthetic images, CPU, offline.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FUSE_RTOL,
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_vanilla_form,
    rel_err,
    without_asr,
)

import asr_fx

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SIZE, CLASSES = 32, 3


def _vanilla(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES)
    return transformers.ResNetForImageClassification(config)


def _instrument(model: torch.nn.Module) -> torch.nn.Module:
    return asr_fx.instrument(model, example_inputs=(torch.randn(2, 3, SIZE, SIZE),))


class _Images(torch.utils.data.Dataset):
    """Random images with labels, as the dicts Trainer feeds to ``model(**batch)``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        image = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
        return {"pixel_values": image, "labels": i % CLASSES}


def _pixels(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(99))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_trainer_save_model_from_pretrained_fuse_save_pretrained(tmp_path, no_network):
    vanilla = _vanilla()
    model = _instrument(vanilla)
    before = asr_values(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Images())
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert trainer.model is model
    assert_asr_trained(before, model)
    trainer.save_model(str(tmp_path / "trained"))

    # a new process would do this: the vanilla class from the folder, instrument, load every weight (asr.* too)
    saved = safetensors_torch.load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert {k for k in saved if k.startswith("asr.")} == set(before)
    reloaded = _instrument(transformers.ResNetForImageClassification.from_pretrained(str(tmp_path / "trained")))
    assert_own_model(reloaded, vanilla)
    reloaded.load_state_dict(saved)
    x = _pixels()
    want = _logits(model, x)
    assert torch.equal(_logits(reloaded, x), want)
    assert rel_err(want, _logits(without_asr(model, vanilla), x)) > 1e-3  # the trained blocks act

    fused = asr_fx.fuse(reloaded)
    assert_vanilla_form(fused, vanilla)
    assert rel_err(want, _logits(fused, x)) <= FUSE_RTOL
    fused.save_pretrained(str(tmp_path / "fused"))
    served, info = transformers.ResNetForImageClassification.from_pretrained(str(tmp_path / "fused"),
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(served, x), _logits(fused, x))

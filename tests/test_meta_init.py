"""ASR blocks are initialised the PyTorch way: built on the meta device, instrumented, ``to_empty``, then the
``reset_parameters`` loop gives what instrumenting on a real device gives (constants exactly, random
inits with the same draws for the same seed, and the same distribution inside a whole model)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.asr import ASR, make_site_block
from asr_fx.models import cifar_resnet

BUILT_IN = ["se", "eca", "srm", "ie", "spa", "cbam"]
SETTINGS = [dict(psi_init=0.1), dict(psi_init=("normal", 0.5)), dict(preset="transformer")]
#: the inits that are constants: (attention, setting) -> True when every attention parameter is a fixed value
CONSTANT_NETS = {"ie", "srm"}


def _reset_all(model: nn.Module) -> None:
    for module in model.modules():  # pre-order: a block before its attention network's layers
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _blocks(model: nn.Module) -> dict[str, ASR]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ASR)}


@pytest.mark.parametrize("setting", SETTINGS, ids=["const", "normal", "transformer"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_reset_parameters_redraws_what_the_constructor_drew(name, setting):
    torch.manual_seed(3)
    block = make_site_block(16, -3, name, **setting)
    made = copy.deepcopy(block.state_dict())
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(3)
    block.reset_parameters()
    for key, value in block.state_dict().items():
        assert torch.equal(value, made[key]), key


@pytest.mark.parametrize("setting", SETTINGS, ids=["const", "normal", "transformer"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_meta_instrument_to_empty_reset_gives_the_real_device_init(name, setting):
    torch.manual_seed(0)
    real = asr_fx.instrument(cifar_resnet(depth=11), name, **setting)
    with torch.device("meta"):
        vanilla = cifar_resnet(depth=11)
    meta = asr_fx.instrument(vanilla, name, **setting)
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in meta.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))  # what to_empty left must not survive
    _reset_all(meta)
    blocks, want = _blocks(meta), _blocks(real)
    assert blocks.keys() == want.keys() and blocks
    filled = setting.get("preset") == "transformer"
    for key, block in blocks.items():
        ref = want[key]
        assert block.psi_init == ref.psi_init and block.attention_init == ref.attention_init
        if setting.get("psi_init") == ("normal", 0.5):
            assert block.psi.shape == ref.psi.shape and 0.2 < float(block.psi.detach().std()) < 1.0
            assert not torch.equal(block.psi, ref.psi) or block.psi.numel() == 1
        else:
            assert torch.equal(block.psi, ref.psi), key
        got, exp = block.attention.state_dict(), ref.attention.state_dict()
        for pname, value in got.items():
            assert value.shape == exp[pname].shape and torch.isfinite(value).all(), (key, pname)
            if filled or name in CONSTANT_NETS:
                assert torch.equal(value, exp[pname]), (key, pname)  # constants: exactly
            else:  # PyTorch's default (uniform) layer init: the same bound
                bound = float(exp[pname].abs().max())
                assert float(value.abs().max()) <= bound * 1.5 + 1e-6, (key, pname)
                assert value.numel() < 8 or float(value.std()) > bound / 10, (key, pname)
    if filled:
        assert all(torch.equal(p, torch.full_like(p, 1e-3)) for k, p in meta.named_parameters()
                   if k.startswith("asr.") and ".attention." in k)
    # the rest of the model is the vanilla model's own business: finite after its own reset_parameters
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(meta.eval()(x)).all()


def test_the_fill_survives_deepcopy_and_pickling():
    block = make_site_block(16, -3, "se", preset="transformer")
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        with torch.no_grad():
            for p in other.parameters():
                p.zero_()
        _reset_all(other)
        assert all(torch.equal(p, torch.full_like(p, 1e-3)) for p in other.parameters())
    assert all(torch.equal(p, torch.full_like(p, 1e-3)) for p in block.parameters())  # the original untouched


def test_bn_affine_blocks_reset_too():
    torch.manual_seed(0)
    with torch.device("meta"):
        vanilla = cifar_resnet(depth=11)
    meta = asr_fx.instrument(vanilla, "se", psi_init=0.25, bn_affine_form=True)
    fused_blocks = [m for m in meta.modules() if type(m).__name__ == "BatchNormAffineASR"]
    assert fused_blocks
    meta.to_empty(device="cpu")
    _reset_all(meta)
    for block in fused_blocks:
        assert torch.equal(block.psi, torch.full_like(block.psi, 0.25))

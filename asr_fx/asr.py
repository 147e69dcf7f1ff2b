"""The ASR block and how one is made for a site: ``x * act(F(psi))`` with a learnable constant input ``psi``.

The block classes (:class:`ASR`, :class:`BatchNormAffineASR`) live in :mod:`asr_fx.passes.forms.asr_blocks`,
so the graph passes that insert and undo them import nothing above ``asr_fx.passes``; this module
re-exports them and adds the paper's presets and :func:`make_site_block` (attention network from
the registry, checked, wrapped in a block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from asr_fx import attention as registry
from asr_fx._util import psi_shape_of
from asr_fx.errors import InvalidOptionError
from asr_fx.passes.forms.asr_blocks import (
    ACTIVATIONS,
    ASR,
    BatchNormAffineASR,
    PsiInit,
    batch_norm_forward,
    computes_like_batch_norm,
    fill_attention,
    init_psi,
    is_affine_batch_norm,
)
from asr_fx.passes.graph.modes import preserved_training_modes

__all__ = ["ACTIVATIONS", "ASR", "BatchNormAffineASR", "PRESETS", "PsiInit", "batch_norm_forward",
           "check_attention_output",
           "computes_like_batch_norm", "fill_parameters", "init_psi", "is_affine_batch_norm", "make_site_block",
           "resolve_preset"]

#: named settings from the paper. ``cnn``: sigmoid, psi = 0.1 (Appendix B.2, ResNet/VGG/...);
#: ``transformer``: tanh, psi and every parameter of the attention network initialised to 1e-3
#: (Appendix B.2, ViT). ``attention_init`` fills the attention network's parameters with a constant.
PRESETS: dict[str, dict[str, Any]] = {
    "cnn": {"activation": "sigmoid", "psi_init": 0.1, "attention_init": None},
    "transformer": {"activation": "tanh", "psi_init": 1e-3, "attention_init": 1e-3},
}

_DEFAULTS = {"activation": "sigmoid", "psi_init": 0.1}


def resolve_preset(preset: str | None, activation: str, psi_init: PsiInit) -> tuple[str, PsiInit, float | None]:
    """``(activation, psi_init, attention_init)`` after applying ``preset`` (``None``: no preset).

    A preset sets all three; an ``activation``/``psi_init`` given beside it must be the default
    or the preset's own value, else this raises (two settings for one knob is a mistake).
    """
    if preset is None:
        return activation, psi_init, None
    if preset not in PRESETS:
        raise InvalidOptionError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    for knob, value in (("activation", activation), ("psi_init", psi_init)):
        if value != _DEFAULTS[knob] and value != chosen[knob]:
            raise InvalidOptionError(
                f"preset={preset!r} sets {knob}={chosen[knob]!r}, but {knob}={value!r} was also given; "
                f"drop one of them"
            )
    return chosen["activation"], chosen["psi_init"], chosen["attention_init"]


def fill_parameters(module: nn.Module, value: float) -> None:
    """Set every parameter of ``module`` to the constant ``value`` (the transformer preset's init); its
    ``reset_parameters`` loop then restores that value (:func:`asr_fx.passes.forms.asr_blocks.fill_attention`)."""
    fill_attention(module, value)


def check_attention_output(net: nn.Module, channels: int) -> None:
    """Run ``net`` once on a zero psi (eval mode, no grad) and refuse it unless it returns ``channels`` values."""
    with preserved_training_modes(net), torch.no_grad():
        out = net.eval()(torch.zeros(psi_shape_of(net)))
    if not isinstance(out, torch.Tensor) or out.numel() != channels:
        got = f"{out.numel()} values of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise InvalidOptionError(
            f"attention {type(net).__name__} returned {got} for a site of {channels} channels: forward(psi) "
            "must return one value per channel (before the activation)"
        )


def make_site_block(
    channels: int,
    channel_pos: int,
    attention: str | Callable[..., nn.Module],
    *,
    delta: int = 1,
    activation: str = "sigmoid",
    psi_init: PsiInit = 0.1,
    learnable_psi: bool = True,
    attention_kwargs: dict | None = None,
    preset: str | None = None,
) -> nn.Module:
    """The module placed at one site: one :class:`ASR` block, or ``nn.Sequential`` of ``delta`` of them.

    ``preset`` names an entry of :data:`PRESETS` (e.g. ``"transformer"``); see :func:`resolve_preset`.
    """
    if delta < 1:
        raise InvalidOptionError(f"delta is the number of ASR blocks per site and must be >= 1, got {delta}")
    activation, psi_init, attention_init = resolve_preset(preset, activation, psi_init)

    def one() -> ASR:
        net = registry.create(attention, channels, **(attention_kwargs or {}))
        check_attention_output(net, channels)
        return ASR(channels, net, channel_pos=channel_pos, activation=activation, psi_init=psi_init,
                   learnable_psi=learnable_psi, attention_init=attention_init)

    return one() if delta == 1 else nn.Sequential(*(one() for _ in range(delta)))

"""Attention networks ``F`` that run on ``psi`` inside an :class:`asr_fx.ASR` block, and their registry.

An attention network is an ``nn.Module`` with an attribute ``psi_shape`` (the shape of one pooled
descriptor, e.g. ``(1, C, 1, 1)``) whose ``forward(psi)`` returns ``C`` values before the
activation. Its pooling step is skipped: ``psi`` stands in for the pooled input.

``create(name, channels, **kw)`` builds one by name; ``register(name, factory)`` adds a name;
``unregister(name)`` removes one. Built in (each module's docstring states its psi form):

==========  ======================================  ==============
name        network                                 psi shape
==========  ======================================  ==============
``se``      Squeeze-and-Excitation                  ``(1, C, 1, 1)``
``eca``     Efficient Channel Attention             ``(1, C, 1, 1)``
``srm``     Style-based Recalibration (mean, std)   ``(1, C, 2)``
``ie``      Instance Enhancement (IEBN's gate)      ``(1, C, 1, 1)``
``spa``     Spatial Pyramid Attention, scales 1/2/4 ``(1, C, 21)``
``cbam``    CBAM's channel branch (avg, max)        ``(2, C, 1, 1)``
==========  ======================================  ==============

Not built in, because no honest psi form exists: Gather-Excite's gather is a spatial map
(a per-position scale does not fold into a layer's per-channel weights); DIA shares one LSTM
across the blocks of a stage, whose state passes from site to site, so its network is not a
function of one site's psi.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from asr_fx._util import psi_shape_of
from asr_fx.errors import AttentionNetworkError, InvalidOptionError, UnknownAttentionError

from ._width import hidden_width
from .cbam import CBAMChannel
from .eca import EfficientChannelAttention
from .ie import InstanceEnhancement
from .se import SqueezeExcite
from .spa import SpatialPyramidAttention
from .srm import StyleRecalibration

AttentionFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, AttentionFactory] = {}


def register(name: str, factory: AttentionFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(channels, **kw) -> nn.Module`` under ``name``."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise InvalidOptionError(f"attention {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a no-op if it is not there)."""
    _REGISTRY.pop(name.lower(), None)


def names() -> list[str]:
    """The registered attention names."""
    return sorted(_REGISTRY)


def create(name: str | AttentionFactory, channels: int, **kwargs) -> nn.Module:
    """Build attention network ``name`` (or call a factory/class directly) for ``channels``."""
    if callable(name):
        module = name(channels, **kwargs)
    else:
        try:
            factory = _REGISTRY[name.lower()]
        except KeyError:
            raise UnknownAttentionError(
                f"unknown attention {name!r}; registered: {', '.join(names())}. Register your own with "
                "asr_fx.attention.register(name, factory), or pass the factory itself as attention=",
                name=name, registered=names(),
            ) from None
        module = factory(channels, **kwargs)
    if not hasattr(module, "psi_shape"):
        raise AttentionNetworkError(
            f"attention {name!r} built {type(module).__name__} without a `psi_shape` attribute: "
            "an attention network for ASR declares the shape of the psi it takes"
        )
    return module


def resolved_widths(networks: Iterable[tuple[int, nn.Module]], given: Mapping[str, Any] | None = None
                    ) -> dict[str, dict[int, int]]:
    """The widths the built ``(channels, network)`` pairs have, as attention kwargs: ``{"hidden": {64: 4, ...}}``
    (``{"kernel_size": {...}}`` for ECA). Networks without ``resolved_kwargs()`` (custom ones) add nothing,
    nor do kwargs already in ``given``. :func:`asr_fx.instrument` records these in its config."""
    out: dict[str, dict[int, int]] = {}
    for channels, net in networks:
        resolve = getattr(net, "resolved_kwargs", None)
        if not callable(resolve):
            continue
        for key, value in resolve().items():
            if key not in (given or {}):
                out.setdefault(key, {})[int(channels)] = int(value)
    return out


#: the layer of each built-in network whose shape gives its width: ``(key suffix, kwarg, weight rank, dim)``
_WIDTH_LAYERS = {"se": ("attention.fc1.weight", "hidden", None, 0), "spa": ("attention.fc1.weight", "hidden", None, 0),
                 "cbam": ("attention.mlp.0.weight", "hidden", None, 0),
                 "eca": ("attention.conv.weight", "kernel_size", 3, -1)}


def widths_from_state_dict(attention: Any, state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[int, int]]:
    """The widths an instrumented ``state_dict`` was trained with, as attention kwargs for a built-in
    ``attention`` (``{}`` for any other): read from each block's ``psi`` (channels) and first layer.

    For checkpoints that predate recorded widths (asr-fx's SE, CBAM and SPA used ``max(C // 16, 8)``):
    passing these kwargs rebuilds the shapes the weights have."""
    if not isinstance(attention, str) or attention.lower() not in _WIDTH_LAYERS:
        return {}
    suffix, kwarg, rank, dim = _WIDTH_LAYERS[attention.lower()]
    out: dict[str, dict[int, int]] = {}
    for key, psi in state_dict.items():
        if not (key.startswith("asr.") and key.endswith(".psi")) or psi.dim() < 2:
            continue
        weight = state_dict.get(key[: -len("psi")] + suffix)
        if weight is not None and (rank is None or weight.dim() == rank):
            out.setdefault(kwarg, {})[int(psi.shape[1])] = int(weight.shape[dim])
    return out


def _site_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"asr.<site>[.<i>].": {"psi": shape, "attention.fc1.weight": shape, ...}}`` for every ASR block."""
    blocks: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in state_dict:
        if key.startswith("asr.") and key.endswith(".psi"):
            blocks[key[: -len("psi")]] = {}
    for key, value in state_dict.items():
        for prefix, tensors in blocks.items():
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest is not None and (rest == "psi" or rest.startswith("attention.")):
                tensors[rest] = tuple(value.shape)
    return blocks


def matching_attention(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered attention network whose blocks have exactly the keys and shapes of the ``asr.*``
    blocks in ``state_dict`` (each built at its block's channels, with the widths the state_dict has),
    or None when no registered network fits every block."""
    blocks = _site_tensors(state_dict)
    if not blocks:
        return None
    for name in names():
        widths = widths_from_state_dict(name, state_dict)
        fits = True
        for tensors in blocks.values():
            psi = tensors.get("psi")
            if not psi or len(psi) < 2:
                fits = False
                break
            try:
                net = create(name, int(psi[1]), **widths)
            except Exception:  # noqa: BLE001 - a registered factory that cannot be built at these widths does not fit
                fits = False
                break
            built = {"psi": tuple(psi_shape_of(net)),
                     **{f"attention.{k}": tuple(v.shape) for k, v in net.state_dict().items()}}
            if built != tensors:
                fits = False
                break
        if fits:
            return name
    return None


register("se", SqueezeExcite)
register("eca", EfficientChannelAttention)
register("srm", StyleRecalibration)
register("ie", InstanceEnhancement)
register("spa", SpatialPyramidAttention)
register("cbam", CBAMChannel)

__all__ = [
    "CBAMChannel",
    "EfficientChannelAttention",
    "InstanceEnhancement",
    "SpatialPyramidAttention",
    "SqueezeExcite",
    "StyleRecalibration",
    "UnknownAttentionError",
    "create",
    "hidden_width",
    "matching_attention",
    "names",
    "register",
    "resolved_widths",
    "unregister",
    "widths_from_state_dict",
]

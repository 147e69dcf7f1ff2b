"""Attention networks ``F`` that run on ``psi`` inside an :class:`asr_fx.ASR` block, and their registry.

An attention network is an ``nn.Module`` with an attribute ``psi_shape`` (the shape of one pooled
descriptor, e.g. ``(1, C, 1, 1)``) whose ``forward(psi)`` returns ``C`` values before the
activation. Its pooling step is skipped: ``psi`` stands in for the pooled input.

``create(name, channels, **kw)`` builds one by name; ``register(name, factory)`` adds a name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .se import SqueezeExcite

AttentionFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, AttentionFactory] = {}


def register(name: str, factory: AttentionFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(channels, **kw) -> nn.Module`` under ``name``."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"attention {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


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
            raise ValueError(f"unknown attention {name!r}; registered: {', '.join(names())}") from None
        module = factory(channels, **kwargs)
    if not hasattr(module, "psi_shape"):
        raise TypeError(
            f"attention {name!r} built {type(module).__name__} without a `psi_shape` attribute: "
            "an attention network for ASR declares the shape of the psi it takes"
        )
    return module


register("se", SqueezeExcite)

__all__ = ["SqueezeExcite", "create", "names", "register"]

"""The ASR block: ``x * act(F(psi))`` with a learnable constant input ``psi``.

At training time the attention network ``F`` sees ``psi`` instead of ``GAP(x)`` (the paper's
Eq. 4 "without GAP"), so its output ``v`` does not depend on the input: after training ``v`` is a
constant vector and :func:`asr_fx.fuse` folds ``x * v`` into the layer that produced ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardsigmoid": F.hardsigmoid,
}

PsiInit = float | tuple[str, float]


def init_psi(shape: tuple[int, ...], psi_init: PsiInit) -> torch.Tensor:
    """``psi``'s initial value: a constant (the paper's 0.1) or ``("normal", std)``."""
    if isinstance(psi_init, (int, float)):
        return torch.full(shape, float(psi_init))
    kind, value = psi_init
    if kind == "normal":
        return torch.randn(shape) * float(value)
    if kind == "constant":
        return torch.full(shape, float(value))
    raise ValueError(f"psi_init must be a number, ('constant', c) or ('normal', std); got {psi_init!r}")


class ASR(nn.Module):
    """One ASR block at one site.

    Args:
        channels: size of the channel dimension ``x`` is scaled along.
        attention: the attention network ``F``; it takes ``psi`` (shape ``attention.psi_shape``)
            and returns ``channels`` values (any shape), before the activation.
        channel_pos: the channel dimension of ``x`` counted from the right (``-3`` for NCHW,
            ``-1`` for tokens-last); ``v`` is reshaped to broadcast there.
        activation: ``"sigmoid"`` (default), ``"tanh"`` or ``"hardsigmoid"``.
        psi_init: initial ``psi``: a constant (default 0.1) or ``("normal", std)``.
        learnable_psi: ``False`` keeps ``psi`` fixed (a buffer, not a parameter).
    """

    def __init__(
        self,
        channels: int,
        attention: nn.Module,
        *,
        channel_pos: int = -3,
        activation: str = "sigmoid",
        psi_init: PsiInit = 0.1,
        learnable_psi: bool = True,
    ) -> None:
        super().__init__()
        if channel_pos >= 0:
            raise ValueError(f"channel_pos counts from the right and must be negative, got {channel_pos}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.channels = channels
        self.channel_pos = channel_pos
        self.activation = activation
        self.attention = attention
        psi = init_psi(tuple(attention.psi_shape), psi_init)
        if learnable_psi:
            self.psi = nn.Parameter(psi)
        else:
            self.register_buffer("psi", psi)

    @property
    def broadcast_shape(self) -> tuple[int, ...]:
        return (self.channels,) + (1,) * (-self.channel_pos - 1)

    def attention_value(self) -> torch.Tensor:
        """``v = act(F(psi))`` shaped to broadcast over ``x``; the same for every input."""
        v = ACTIVATIONS[self.activation](self.attention(self.psi))
        return v.reshape(self.broadcast_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_value()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_pos={self.channel_pos}, activation={self.activation!r}"


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
) -> nn.Module:
    """The module placed at one site: one :class:`ASR` block, or ``nn.Sequential`` of ``delta`` of them."""
    from asr_fx import attention as registry

    def one() -> ASR:
        net = registry.create(attention, channels, **(attention_kwargs or {}))
        return ASR(channels, net, channel_pos=channel_pos, activation=activation, psi_init=psi_init,
                   learnable_psi=learnable_psi)

    return one() if delta == 1 else nn.Sequential(*(one() for _ in range(delta)))

"""Efficient Channel Attention (Wang et al., CVPR 2020) on psi.

psi form: ``(1, C, 1, 1)``, one pooled descriptor; the GAP step is skipped. ``F`` is a 1-D
convolution without bias across the channel axis, of ECA's adaptive odd kernel size
``k = |log2(C) / gamma + b / gamma|_odd`` (``gamma = 2, b = 1``; ``|t|_odd``: ``t`` truncated to an
int, plus one if even): ``k = 3`` at ``C = 64``, ``5`` at ``C = 128`` and ``256``. ``F`` has ``k``
parameters. The activation is applied by the ASR block. ``kernel_size`` gives ``k`` outright: one
number, or ``{channels: k}`` (how :func:`asr_fx.instrument` records it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from asr_fx.errors import InvalidOptionError

from ._width import PerChannel, per_channel


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size: ``|log2(C) / gamma + b / gamma|`` truncated to an int, made odd."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    def __init__(self, channels: int, kernel_size: PerChannel = None, gamma: float = 2.0, b: float = 1.0) -> None:
        super().__init__()
        given = per_channel(kernel_size, channels, "kernel_size")
        k = given if given is not None else eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise InvalidOptionError(f"ECA's kernel_size must be a positive odd number, got {k}")
        self.channels = channels
        self.psi_shape = (1, channels, 1, 1)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def reset_parameters(self) -> None:
        """Each layer back to its own init, in the order the constructor made them (meta-device init)."""
        for layer in (self.conv,):
            layer.reset_parameters()

    def resolved_kwargs(self) -> dict[str, int]:
        """The keyword arguments that rebuild this network's shapes whatever the defaults are."""
        return {"kernel_size": self.kernel_size}

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.conv(psi.reshape(1, 1, self.channels)).reshape(1, self.channels, 1, 1)

"""Efficient Channel Attention (Wang et al., CVPR 2020) on psi.

psi form: ``(1, C, 1, 1)``, one pooled descriptor; the GAP step is skipped. ``F`` is a 1-D
convolution without bias across the channel axis, of odd kernel size
``k = odd(|log2(C) + b| / gamma)`` (``gamma=2, b=1``: ``k = 5`` for ``C = 256``), so ``F`` has
``k`` parameters. The activation is applied by the ASR block.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size: ``|log2(C) + b| / gamma`` rounded down to an int, made odd."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2.0, b: float = 1.0) -> None:
        super().__init__()
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA's kernel_size must be a positive odd number, got {k}")
        self.channels = channels
        self.psi_shape = (1, channels, 1, 1)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.conv(psi.reshape(1, 1, self.channels)).reshape(1, self.channels, 1, 1)

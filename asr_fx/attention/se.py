"""Squeeze-and-Excitation (Hu et al., 2018) on psi.

psi form: ``(1, C, 1, 1)``, one pooled descriptor; the GAP step is skipped. ``F`` is
``conv1x1(C -> h) -> ReLU -> conv1x1(h -> C)`` (with biases, as SE's fully connected layers have);
the activation is applied by the ASR block.

Width: ``h = round(C / reduction)`` with ``reduction = 16`` (SE's r, the one the ASR paper's
models use): 4, 8 and 16 hidden units at ``C = 64, 128, 256``; at least 1. ``min_hidden`` sets a
floor (capped at ``C``); ``hidden`` gives the width outright, one number or ``{channels: width}``
(see :mod:`asr_fx.attention._width`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._width import PerChannel, hidden_width


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: float = 16, min_hidden: int = 1, hidden: PerChannel = None) -> None:
        super().__init__()
        self.hidden = hidden_width(channels, reduction, min_hidden, hidden)
        self.psi_shape = (1, channels, 1, 1)
        self.fc1 = nn.Conv2d(channels, self.hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(self.hidden, channels, 1)

    def reset_parameters(self) -> None:
        """Each layer back to its own init, in the order the constructor made them (meta-device init)."""
        for layer in (self.fc1, self.fc2):
            layer.reset_parameters()

    def resolved_kwargs(self) -> dict[str, int]:
        """The keyword arguments that rebuild this network's shapes whatever the defaults are."""
        return {"hidden": self.hidden}

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(psi)))

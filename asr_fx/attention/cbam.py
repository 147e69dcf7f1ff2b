"""The channel branch of CBAM (Woo et al., ECCV 2018) on psi.

psi form: ``(2, C, 1, 1)``: CBAM's channel branch pools each channel twice, by average and by
max, and runs both descriptors through one shared MLP; psi holds the two descriptors as a batch of
two (row 0 stands for the average, row 1 for the max). ``F(psi) = MLP(psi[0]) + MLP(psi[1])``
with ``MLP = conv1x1(C -> h) -> ReLU -> conv1x1(h -> C)`` without biases (CBAM's
``W1(W0(.))``), ``h = round(C / reduction)``, ``reduction = 16`` (CBAM's r), at least 1;
``min_hidden`` sets a floor, ``hidden`` the width outright (see :mod:`asr_fx.attention._width`).

Symmetry, stated plainly: with a constant ``psi_init`` the two rows start equal and receive equal
gradients, so they stay equal and ``F`` is ``2 * MLP(psi[0])`` (an SE without biases). Start psi
with ``psi_init=("normal", std)`` to let them differ.

CBAM's spatial branch is left out: its map varies over positions, so it is not a per-channel
constant and cannot fold into the layer's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ._width import PerChannel, hidden_width


class CBAMChannel(nn.Module):
    def __init__(self, channels: int, reduction: float = 16, min_hidden: int = 1, hidden: PerChannel = None) -> None:
        super().__init__()
        self.hidden = hidden_width(channels, reduction, min_hidden, hidden)
        self.psi_shape = (2, channels, 1, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, self.hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.hidden, channels, 1, bias=False),
        )

    def reset_parameters(self) -> None:
        """Each layer back to its own init, in the order the constructor made them (meta-device init)."""
        for layer in (self.mlp[0], self.mlp[2]):
            assert isinstance(layer, nn.Conv2d)
            layer.reset_parameters()

    def resolved_kwargs(self) -> dict[str, int]:
        """The keyword arguments that rebuild this network's shapes whatever the defaults are."""
        return {"hidden": self.hidden}

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return self.mlp(psi).sum(dim=0, keepdim=True)

"""Transposed convolution modules (``nn.ConvTranspose1d/2d/3d``, any groups): output channel
``o = g * (out/groups) + j`` takes a scale in the weight's group-``g`` column ``j`` and the bias; input
channels in the weight's first dimension. The formulas are :mod:`.conv`'s, with ``transposed=True``.
"""

from __future__ import annotations

from typing import Any

from torch.nn.modules.conv import _ConvTransposeNd

from .conv import ConvRule


class DeconvRule(ConvRule):
    """``nn.ConvTranspose*d``: the conv rule's layout and scaling (channels first, both sides take a scale,
    reported as ``conv``), for transposed convolutions only."""

    name = "deconv"

    def accepts(self, module: Any) -> bool:
        return isinstance(module, _ConvTransposeNd)


DECONV = DeconvRule()

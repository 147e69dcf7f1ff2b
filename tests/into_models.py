"""Small models for tests/test_fuse_into.py, importable as a factory by the CLI (``into_models:checked_residual``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallResidual(nn.Module):
    """conv-BN-ReLU-conv-BN with ``out += identity`` (a site after bn2, folds into its affine)."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, affine=affine)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out += x
        return F.relu(out)


class CheckedResidual(nn.Module):
    """A check on the input's values at the top (no example input decides it for every input, so the whole
    forward does not trace), a traceable body with a site, and
    a head conv without one (left as the model's own, outside the parts)."""

    def __init__(self, affine: bool = True, classes: int = 4) -> None:
        super().__init__()
        self.body = SmallResidual(affine)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        torch._check(x.abs().sum().item() != 0, lambda: "empty image")  # torch.export keeps it as a runtime check
        return self.head(self.body(x))


def checked_residual(classes: int = 4) -> CheckedResidual:
    """The factory ``asr-fx fuse`` rebuilds the vanilla model with."""
    return CheckedResidual(classes=classes)

"""Recording shapes runs the captured graph as its generated code would: functions and leaf modules that write
into their list arguments work, and a failure is one clear error with nothing printed to stderr."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import asr_fx


def clipped_window(size: list, window: list) -> list:
    """Like torchvision's Swin3D helper: clips the window to the feature size, writing into ``window``."""
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("clipped_window")


class _WindowBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        window = clipped_window([x.shape[2], x.shape[3]], [7, 7])
        context = F.avg_pool2d(x, window, stride=1)
        return F.relu(self.bn(self.conv(x))) + context.mean((2, 3), keepdim=True)


class _ListHead(nn.Module):
    """Replaces the items of the list it is given (as a detection head over feature levels may)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 2, 1) for _ in range(2))

    def forward(self, feats: list):
        for i, conv in enumerate(self.convs):
            feats[i] = conv(feats[i])
        return torch.cat([f.flatten(1) for f in feats], 1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = _WindowBlock()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = _ListHead()

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head([x, self.down(x)])


def test_list_writing_calls_run_in_shape_recording(capfd):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 5, 5)
    instrumented = asr_fx.instrument(model, example_inputs=(x,), leaf_modules=[_ListHead])
    assert "block_bn" in instrumented.asr
    assert capfd.readouterr().err == ""
    instrumented.eval()
    with torch.no_grad():
        torch.testing.assert_close(instrumented(x).shape, model(x).shape)


def test_a_graph_that_fails_on_example_inputs_names_the_node_and_prints_nothing(capfd):
    class _Picky(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], 3, -1)

    class _Net2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.picky = _Picky()

        def forward(self, x):
            return self.picky(self.conv(x))

    with pytest.raises(asr_fx.ASRError, match=r"graph node `picky`.*RuntimeError") as info:
        asr_fx.instrument(_Net2(), example_inputs=(torch.randn(2, 3, 4, 5),), leaf_modules=[_Picky])
    assert len(str(info.value)) < 1000
    assert "Traceback" not in capfd.readouterr().err

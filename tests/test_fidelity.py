"""Fidelity to the paper and to the authors' models: default widths, their SE found in every spelling,
their placement, their function, their deploy-time folding and their checkpoint file.

The authors'-style model is :mod:`fidelity_models` (written here from the paper's description).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from fidelity_models import ASRBatchNorm2d, authors_resnet
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import asr_fx
from asr_fx import attention
from asr_fx.passes import trace
from asr_fx.passes.placement.attention_patterns import find_channel_attention

DEPTH = 11  # one bottleneck per stage: channels 64, 128, 256 as in ResNet-164
BN3 = ["layer1_0_bn3", "layer2_0_bn3", "layer3_0_bn3"]
X = (2, 3, 32, 32)


# --- the paper's default widths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["se", "cbam", "spa"])
def test_hidden_width_is_round_c_over_16_without_a_floor(name):
    assert [attention.create(name, c).hidden for c in (64, 128, 256)] == [4, 8, 16]
    assert attention.create(name, 40).hidden == 2  # Python's round: 2.5 -> 2
    assert attention.create(name, 24).hidden == 2  # 1.5 -> 2
    assert attention.create(name, 4).hidden == 1  # C / r < 1/2 would round to 0: at least one unit
    assert attention.create(name, 64, min_hidden=8).hidden == 8  # a floor, on request
    assert attention.create(name, 4, min_hidden=8).hidden == 4  # the floor is capped at C
    assert attention.create(name, 64, reduction=4).hidden == 16
    assert attention.create(name, 64, hidden={"64": 7, 128: 9}).hidden == 7  # as JSON writes a mapping
    with pytest.raises(ValueError, match="no width for a site of 32 channels"):
        attention.create(name, 32, hidden={64: 4})


def test_eca_kernel_is_the_adaptive_odd_size():
    # k = |log2(C) / 2 + 1 / 2|_odd
    assert [attention.create("eca", c).kernel_size for c in (16, 64, 128, 256, 512)] == [3, 3, 5, 5, 5]
    assert attention.create("eca", 1024).kernel_size == 5 and attention.create("eca", 2048).kernel_size == 7
    assert attention.create("eca", 64, kernel_size={64: 7}).conv.kernel_size == (7,)


def test_instrument_builds_and_records_the_papers_widths():
    gm = asr_fx.instrument(authors_resnet(DEPTH))
    widths = {key: block.attention.fc1.out_channels for key, block in gm.asr.items()}
    assert widths == {"layer1_0_bn3": 4, "layer2_0_bn3": 8, "layer3_0_bn3": 16}
    assert asr_fx.get_config(gm)["attention_kwargs"] == {"hidden": {64: 4, 128: 8, 256: 16}}
    eca = asr_fx.instrument(authors_resnet(DEPTH), attention="eca")
    assert asr_fx.get_config(eca)["attention_kwargs"] == {"kernel_size": {64: 3, 128: 5, 256: 5}}


def test_a_checkpoint_with_the_old_floor_reloads_with_the_widths_its_state_dict_has(tmp_path):
    old = asr_fx.instrument(authors_resnet(DEPTH), attention_kwargs={"min_hidden": 8})  # max(C // 16, 8)
    state = old.state_dict()
    assert asr_fx.get_config(old)["attention_kwargs"]["hidden"] == {64: 8, 128: 8, 256: 16}
    widths = attention.widths_from_state_dict("se", state)
    assert widths == {"hidden": {64: 8, 128: 8, 256: 16}}
    assert attention.widths_from_state_dict("my_package:MyNet", state) == {}  # only built-ins
    again = asr_fx.instrument(authors_resnet(DEPTH), attention_kwargs=widths)
    again.load_state_dict(state)  # strict: every shape fits
    # a new checkpoint records its widths, so it reloads whatever the defaults become
    asr_fx.save(old, tmp_path / "old.pt", factory="fidelity_models:authors_resnet", factory_kwargs={"depth": DEPTH})
    assert asr_fx.load(tmp_path / "old.pt").asr["layer1_0_bn3"].attention.fc1.out_channels == 8


def test_an_old_asr_fx_checkpoint_loads_with_the_widths_its_state_dict_has(tmp_path):
    """A checkpoint saved before widths were recorded (attention_kwargs {}, SE at max(C // 16, 8)) loads as it
    was trained: the widths are read from its state_dict; --attention-args still overrides them."""
    from asr_fx.foreign_checkpoints import load_checkpoint

    old = asr_fx.instrument(authors_resnet(DEPTH), attention_kwargs={"min_hidden": 8})
    path = tmp_path / "old.pt"
    asr_fx.save(old, path, factory="fidelity_models:authors_resnet", factory_kwargs={"depth": DEPTH})
    ckpt = torch.load(path, weights_only=True)
    ckpt["asr"]["attention_kwargs"] = {}  # as asr-fx wrote it before
    torch.save(ckpt, path)
    loaded = asr_fx.load(path)
    assert loaded.asr["layer1_0_bn3"].attention.fc1.out_channels == 8
    again = load_checkpoint(path, asr_options={"attention_kwargs": {"min_hidden": 8}}).model
    x = torch.randn(X)
    with torch.no_grad():
        assert torch.equal(loaded(x), old.eval()(x)) and torch.equal(again(x), old(x))
    # a bare state_dict of the old model (the CLI's --model path) is instrumented at its widths too
    torch.save(old.state_dict(), tmp_path / "bare.pt")
    bare = load_checkpoint(tmp_path / "bare.pt", factory="fidelity_models:authors_resnet",
                           factory_kwargs={"depth": DEPTH}).model
    with torch.no_grad():
        assert torch.equal(bare(x), old(x))


# --- existing attention found by dataflow -------------------------------------------------------------


class SpelledSE(nn.Module):
    """One SE written in one of the spellings code bases use."""

    def __init__(self, channels: int, flatten: str, expand: str, layer: str, act: str, gate: str, order: str,
                 pool: str = "adaptive"):
        super().__init__()
        self.flatten, self.expand, self.layer, self.gate, self.order = flatten, expand, layer, gate, order
        hidden = max(round(channels / 4), 1)
        self.pool = {"adaptive": nn.AdaptiveAvgPool2d(1), "AvgPool2d(6)": nn.AvgPool2d(6),
                     "avg_pool2d(x, x.size(2))": lambda x: F.avg_pool2d(x, x.size(2)),
                     "avg_pool2d(x, x.size()[2:])": lambda x: F.avg_pool2d(x, x.size()[2:]),
                     "max_pool2d(x, (h, w))": lambda x: F.max_pool2d(x, (x.size(2), x.size(3))),
                     "avg_pool2d(x, 2)": lambda x: F.avg_pool2d(x, 2)}[pool]
        if layer == "linear":
            self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        else:
            self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)
        self.act = {"relu": nn.ReLU(inplace=True), "silu": nn.SiLU(), "gelu": nn.GELU()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.pool(x)
        if self.layer == "linear":
            if self.flatten == "view":
                y = y.view(x.size(0), -1)
            elif self.flatten == "flatten":
                y = y.flatten(1)
            elif self.flatten == "reshape":
                y = y.reshape(b, -1)
            else:
                y = y.squeeze(-1).squeeze(-1)
        y = self.fc2(self.act(self.fc1(y)))
        if self.gate == "sigmoid":
            y = torch.sigmoid(y)
        elif self.gate == "hardsigmoid":
            y = F.hardsigmoid(y)
        else:
            y = F.relu6(y + 3) / 6
        if self.layer == "linear":
            if self.expand == "view":
                y = y.view(b, c, 1, 1)
            elif self.expand == "none":
                y = y[:, :, None, None]
            elif self.expand == "unsqueeze":
                y = y.unsqueeze(-1).unsqueeze(-1)
            else:
                y = y.view(b, c, 1, 1).expand_as(x)
        return y * x if self.order == "gate_first" else x * y


class SEBlock(nn.Module):
    """conv -> bn -> SE, then a residual add."""

    def __init__(self, **spelling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.se = SpelledSE(8, **spelling)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.se(self.bn(self.conv(x))) + x)
        return self.head(y.mean((2, 3)))


SPELLINGS = [  # every spelling at least once, each with both operand orders below
    dict(flatten="view", expand="view", layer="linear", act="relu", gate="sigmoid"),
    dict(flatten="flatten", expand="none", layer="linear", act="silu", gate="hardsigmoid"),
    dict(flatten="reshape", expand="unsqueeze", layer="linear", act="gelu", gate="relu6"),
    dict(flatten="squeeze", expand="expand_as", layer="linear", act="relu", gate="relu6"),
    dict(flatten="view", expand="none", layer="linear", act="relu", gate="sigmoid"),
    dict(flatten="-", expand="-", layer="conv", act="silu", gate="sigmoid"),
    dict(flatten="-", expand="-", layer="conv", act="relu", gate="relu6"),
    # global pooling written as a window over the whole map (CIFAR code); nn.AvgPool2d(6) needs shapes
    dict(flatten="view", expand="view", layer="linear", act="relu", gate="sigmoid", pool="avg_pool2d(x, x.size(2))"),
    dict(flatten="flatten", expand="none", layer="linear", act="relu", gate="sigmoid",
         pool="avg_pool2d(x, x.size()[2:])"),
    dict(flatten="-", expand="-", layer="conv", act="relu", gate="sigmoid", pool="max_pool2d(x, (h, w))"),
    dict(flatten="view", expand="view", layer="linear", act="relu", gate="sigmoid", pool="AvgPool2d(6)"),
]


def _se_block(spelling: dict, order: str) -> nn.Module:
    torch.manual_seed(0)
    model = SEBlock(order=order, **spelling)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("order", ["gate_first", "x_first"])
@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: "-".join(s.values()))
def test_each_spelling_is_found_converted_and_fused(spelling, order):
    model = _se_block(spelling, order)
    x = torch.randn(2, 8, 6, 6)
    gm = trace(model)
    ShapeProp(gm).propagate(x)
    found = find_channel_attention(gm)
    expected = "hardsigmoid" if spelling["gate"] != "sigmoid" else "sigmoid"
    assert [(a.module, a.channels, a.activation) for a in found] == [("se", 8, expected)]
    without_shapes = find_channel_attention(trace(model))
    assert len(without_shapes) == (0 if spelling.get("pool") == "AvgPool2d(6)" else 1)
    # the residual rule walks back through the SE to the norm it scales
    assert [s.node for s in asr_fx.find_sites(model, "residual", existing=False)] == ["bn"]
    for sites in (None, ["bn"]):  # the SE alone, and with an ASR block beside it at the same place
        gm = asr_fx.instrument(model, sites=sites or ["conv"], convert_existing=True, example_inputs=(x,)).eval()
        assert "se" in gm.asr and find_channel_attention(trace(gm)) == []
        assert gm.asr["se"].activation == expected
        with torch.no_grad():
            for block in gm.asr.values():
                block.psi.add_(0.05 * torch.randn_like(block.psi))
        fused = asr_fx.fuse(gm, strict=True, example_inputs=(x,))
        with torch.no_grad():
            assert rel_err(gm(x), fused(x)) <= 1e-5
        assert sum(p.numel() for p in fused.parameters()) == sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("se."))


class UnmatchedGateSE(SpelledSE):
    """A gate no pattern lists (``0.5 + 0.5 * tanh``): placement must not depend on recognising it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.pool(x).flatten(1))))
        return (0.5 + 0.5 * torch.tanh(y))[:, :, None, None] * x


def test_a_window_that_does_not_cover_the_map_is_not_global():
    # a 3x3 map of cells from 6x6: not a per-channel descriptor
    model = _se_block(dict(flatten="-", expand="-", layer="conv", act="relu", gate="sigmoid", pool="avg_pool2d(x, 2)"),
                      "x_first")
    assert find_channel_attention(trace(model)) == []


class UnmatchedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.se = UnmatchedGateSE(8, "-", "-", "linear", "relu", "sigmoid", "gate_first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.se(self.bn(self.conv(x))) + x)


def test_the_residual_walk_follows_any_gate_computed_from_the_branch():
    # deep enough that the graph before a gate is far larger than the gate's own network
    model = nn.Sequential(*(UnmatchedBlock() for _ in range(8)))
    assert find_channel_attention(trace(model)) == []
    expected = [f"_{i}_bn" for i in range(8)]
    assert [s.node for s in asr_fx.find_sites(model, "residual", existing=False)] == expected
    assert [s.node for s in asr_fx.find_sites(model, "auto", existing=False)] == expected


class MixedScale(nn.Module):
    """``x * g(x, y)``: the scale reads the shortcut too, so it is not a scale of ``x`` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.sigmoid(y.mean((2, 3), keepdim=True) + x.mean((2, 3), keepdim=True)) * y + x


def test_the_residual_walk_stops_at_a_product_with_another_value():
    assert asr_fx.find_sites(MixedScale(), "residual", existing=False) == []


# --- the authors'-style ResNet --------------------------------------------------------------------------


@pytest.mark.parametrize("se", [False, True], ids=["resnet", "se-resnet"])
@pytest.mark.parametrize("rule", ["auto", "residual"])
def test_instrument_places_exactly_the_hand_written_sites(rule, se):
    hand = authors_resnet(DEPTH, asr=True, se=se)
    hand_sites = [name.replace(".", "_") for name, m in hand.named_modules() if isinstance(m, ASRBatchNorm2d)]
    assert hand_sites == BN3
    sites = asr_fx.find_sites(authors_resnet(DEPTH, se=se), rule, existing=False)
    assert [s.node for s in sites] == hand_sites
    gm = asr_fx.instrument(authors_resnet(DEPTH, se=se), rule=rule)
    assert sorted(gm.asr.keys()) == hand_sites


def _hand_trained(se: bool, seed: int = 0) -> nn.Module:
    """The hand-written ASR model in float64 with every parameter and BN statistic moved off its start."""
    torch.manual_seed(seed)
    hand = authors_resnet(DEPTH, asr=True, se=se).double()
    with torch.no_grad():
        for p in hand.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in hand.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return hand


def _mapped(hand: nn.Module, se: bool, bn_affine_form: bool) -> nn.Module:
    """``instrument(vanilla)`` with the hand-written model's weights: psi and F move under ``asr.<site>``."""
    gm = asr_fx.instrument(authors_resnet(DEPTH, se=se).double(), bn_affine_form=bn_affine_form)
    state = {}
    for key, value in hand.state_dict().items():
        path, _, leaf = key.rpartition(".")
        for site in BN3:
            prefix = site.replace("_", ".")
            if key == f"{prefix}.psi":
                key = f"asr.{site}.psi"
            elif key.startswith(f"{prefix}.attention."):
                key = f"asr.{site}.attention.{key[len(prefix) + len('.attention.'):]}"
                value = value.reshape(*value.shape, *([1, 1] if leaf == "weight" else []))
        state[key] = value
    gm.load_state_dict(state)  # strict: the same parameters, nothing missing or extra
    return gm, state


@pytest.mark.parametrize("bn_affine_form", [False, True], ids=["plain", "BN-affine"])
@pytest.mark.parametrize("se", [False, True], ids=["asr", "asr+se"])
def test_instrumented_computes_the_hand_written_function_and_gradients(se, bn_affine_form):
    hand = _hand_trained(se)
    gm, state = _mapped(hand, se, bn_affine_form)
    names = {v.data_ptr(): k for k, v in state.items()}
    x = torch.randn(X, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tol = 1e-12 if not bn_affine_form else 1e-10
    for train in (True, False):
        hand.train(train), gm.train(train)
        hand.zero_grad(), gm.zero_grad()
        out_hand, out_gm = hand(x), gm(x)
        assert rel_err(out_hand, out_gm) <= tol
        out_hand.square().sum().backward()
        out_gm.square().sum().backward()
        grads = dict(gm.named_parameters())
        for key, p in hand.named_parameters():
            mapped = names.get(p.data_ptr(), key)
            assert mapped in grads, key
            g = grads[mapped].grad
            assert g is not None and p.grad is not None, key
            assert rel_err(p.grad, g.reshape(p.grad.shape)) <= tol * 100, key
        # the gradients compared are not all zero: every block's output bias trains; psi does wherever one of
        # F's round(C / 16) ReLU units is alive at psi (with this seed layer1's 4 units all start below zero: the
        # paper's width on a constant psi leaves such a block a learnable per-channel scale, sigmoid(fc2.bias))
        blocks = [m for m in hand.modules() if isinstance(m, ASRBatchNorm2d)]
        assert all(m.attention.fc2.bias.grad.abs().sum() > 0 for m in blocks)
        assert sum(bool(m.psi.grad.abs().sum() > 0) for m in blocks) >= 2


@pytest.mark.parametrize("se", [False, True], ids=["asr", "asr+se"])
def test_fuse_equals_the_hand_written_deploy_folding(se):
    hand = _hand_trained(se).eval()
    gm, _ = _mapped(hand, se, bn_affine_form=True)
    fused = asr_fx.fuse(gm.eval(), strict=True)
    deployed = copy.deepcopy(hand)
    deployed.switch_to_deploy()
    x = torch.randn(X, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(hand(x), deployed(x)) <= 1e-12  # their folding is exact
        assert rel_err(deployed(x), fused(x)) <= 1e-12
    for site in BN3:
        path = site.replace("_", ".")
        ours, theirs = fused.get_submodule(path), deployed.get_submodule(path)
        assert torch.allclose(ours.weight, theirs.weight, rtol=1e-12, atol=0)
        assert torch.allclose(ours.bias, theirs.bias, rtol=1e-12, atol=0)
    vanilla = authors_resnet(DEPTH, se=se)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in vanilla.parameters())


@pytest.mark.parametrize("asr", [False, True], ids=["se", "asr+se"])
def test_find_sites_lists_every_se_block(asr):
    model = authors_resnet(20, asr=asr, se=True)  # two blocks per stage
    existing = [s for s in asr_fx.find_sites(model) if s.rule == "existing"]
    blocks = [name for name, m in model.named_modules() if getattr(m, "se", None) is not None]
    assert len(existing) == len(blocks) == 6
    assert [s.module for s in existing] == blocks
    assert [s.channels for s in existing] == [64, 64, 128, 128, 256, 256]


def test_cli_fuses_the_authors_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    hand = authors_resnet(DEPTH, asr=True)
    with torch.no_grad():
        for m in hand.modules():
            if isinstance(m, ASRBatchNorm2d):
                m.psi.add_(0.3 * torch.randn_like(m.psi))
                m.running_mean.uniform_(-0.2, 0.2)
    hand.eval()
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in hand.state_dict().items()}, "epoch": 164,
                "best_acc": 75.2, "optimizer": {}}, ckpt)
    out = tmp_path / "model.onnx"
    cli = Path(sys.executable).with_name("asr-fx")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([str(cli), "fuse", str(ckpt), "-o", str(out), "--json", "--model",
                           "fidelity_models:authors_resnet",
                           "--factory-args", json.dumps({"depth": DEPTH, "asr": True}),
                           "--input-shape", "1,3,32,32"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["verified"]
    assert report["fusion"]["folded"] == len(BN3) and report["fusion"]["unfolded"] == 0
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = hand(x).numpy()
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()

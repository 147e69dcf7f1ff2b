"""Placement: existing channel attention found by pattern, the placement rules, find_sites, inspect."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import perturb_asr, rel_err, train_step
from torch import nn

from asr_fx.passes import trace
from asr_fx.passes.placement.attention_patterns import find_channel_attention


class ECA(nn.Module):
    """Hand-written ECA: GAP -> 1-D conv across channels -> sigmoid -> x * gate (expand_as)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid().expand_as(x)


class ECANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.eca = ECA()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.eca(torch.relu(self.bn(self.conv(x))))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))  # no parameters: not an attention network
        gated = y * torch.sigmoid(self.fc.weight.sum())  # a gate that is not fed by pooling
        return self.fc(gated.mean((2, 3)))


@pytest.mark.parametrize(
    ("name", "count", "first_module", "first_channels", "activation"),
    [
        ("mobilenet_v3_small", 9, "features.1.block.1", 16, "hardsigmoid"),
        ("efficientnet_b0", 16, "features.1.0.block.1", 32, "sigmoid"),
        ("regnet_y_400mf", 16, "trunk_output.block1.block1-0.f.se", 48, "sigmoid"),
    ],
)
def test_finds_torchvision_squeeze_excitation(name, count, first_module, first_channels, activation):
    model = getattr(torchvision.models, name)()
    gm = trace(model)
    found = find_channel_attention(gm)
    se_modules = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    assert len(found) == count == len(se_modules)
    assert [a.module for a in found] == se_modules
    first = found[0]
    assert (first.module, first.channels, first.channel_pos, first.activation) == (
        first_module, first_channels, -3, activation)
    nodes = {n.name: n for n in gm.graph.nodes}
    for att in found:
        mul = nodes[att.mul]
        assert {a.name for a in mul.args} == {att.gate, att.feature}
        assert nodes[att.pool].args[0].name == att.feature
        assert gm.get_submodule(att.module).fc2.out_channels == att.channels


def test_finds_hand_written_eca_only():
    gm = trace(ECANet())
    found = find_channel_attention(gm)
    assert len(found) == 1
    att = found[0]
    assert (att.module, att.pool, att.feature, att.channels, att.channel_pos) == ("eca", "eca_pool", "relu", 16, -3)
    assert "eca_conv" in att.network
    assert gm.graph.find_nodes(op="call_method", target="sigmoid")[0].name == att.gate


def test_no_attention_in_plain_resnet():
    assert find_channel_attention(trace(torchvision.models.resnet18())) == []


# --- auto placement per torchvision family (site lists only: tracing, no training) ---------------

from torchvision.ops.misc import Conv2dNormActivation  # noqa: E402

import asr_fx  # noqa: E402


def _auto(model: nn.Module) -> list:
    return asr_fx.find_sites(model, existing=False)


def _bn_before_activation(model: nn.Module) -> list[str]:
    """torchvision's conv -> BN -> activation blocks: the BN of each (depthwise and pointwise)."""
    return [f"{name}.1" for name, m in model.named_modules() if isinstance(m, Conv2dNormActivation) and len(m) == 3]


def test_auto_resnet18_is_the_residual_rule():
    sites = _auto(torchvision.models.resnet18())
    assert {s.rule for s in sites} == {"residual"}
    assert [s.module for s in sites] == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]


def test_auto_vgg11_bn_puts_asr_between_every_bn_and_relu():
    model = torchvision.models.vgg11_bn(init_weights=False)  # weights do not matter for placement
    sites = _auto(model)
    assert {s.rule for s in sites} == {"norm-act"}
    assert [s.module for s in sites] == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"])
def test_auto_mobilenets_put_asr_after_depthwise_and_pointwise_bn(name):
    model = getattr(torchvision.models, name)()
    sites = _auto(model)
    assert {s.rule for s in sites} == {"norm-act"}
    assert [s.module for s in sites] == _bn_before_activation(model)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert {f"{n[:-2]}.1" for n in depthwise} <= {s.module for s in sites}  # the depthwise layers' BNs too
    assert not any(".fc" in s.module or "avgpool" in s.module for s in sites)  # never inside an SE block


def test_auto_shufflenet_v2_uses_the_last_bn_of_each_branch():
    model = torchvision.models.shufflenet_v2_x0_5()
    sites = _auto(model)
    assert {s.rule for s in sites} == {"branch"}
    expected = []
    for name, m in model.named_modules():
        if type(m).__name__ == "InvertedResidual":
            if len(m.branch1) > 0:
                expected.append(f"{name}.branch1.3")
            expected.append(f"{name}.branch2.6")
    assert [s.module for s in sites] == expected


def test_auto_regnet_y_sites_are_after_the_last_bn_behind_the_se_block():
    model = torchvision.models.regnet_y_400mf()
    sites = _auto(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ResBottleneckBlock"]
    assert {s.rule for s in sites} == {"residual"}
    assert [s.module for s in sites] == [f"{b}.f.c.1" for b in blocks]


def test_auto_convnext_sites_are_the_last_linear_before_layer_scale():
    model = torchvision.models.convnext_tiny()
    sites = _auto(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "CNBlock"]
    assert [(s.module, s.rule, s.channel_pos) for s in sites] == [(f"{b}.block.5", "residual", -1) for b in blocks]


def test_auto_vit_sites_after_attention_and_mlp_fold_into_out_proj_and_mlp():
    model = torchvision.models.vit_b_16(image_size=32)
    sites = _auto(model)
    expected = []
    for i in range(12):
        layer = f"encoder.layers.encoder_layer_{i}"
        expected += [(f"{layer}.self_attention", f"{layer}.self_attention.out_proj"), (f"{layer}.mlp.3",) * 2]
    assert [(s.module, s.fold_target) for s in sites] == expected
    assert {(s.rule, s.channel_pos, s.channels, s.foldable) for s in sites} == {("transformer", -1, 768, True)}
    gm = asr_fx.instrument(model)
    assert asr_fx.get_config(gm)["preset"] == "transformer"
    assert gm.asr[sites[0].node].activation == "tanh"


def test_auto_swin_uses_the_mlp_sites_and_transformer_lists_attention_as_unfoldable():
    model = torchvision.models.swin_t()
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert [(s.module, s.rule) for s in _auto(model)] == [(f"{b}.mlp.3", "transformer") for b in blocks]
    listed = asr_fx.find_sites(model, "transformer", existing=False)
    attention = [s for s in listed if not s.foldable]
    assert [s.module for s in attention] == [f"{b}.attn" for b in blocks]
    assert all("shifted_window_attention" in s.reason for s in attention)
    with pytest.raises(asr_fx.UnfoldableSiteError, match="cannot fold"):
        asr_fx.instrument(model, rule="transformer")


def test_auto_swin_v2_post_norm_sites_are_the_norms_after_attention_and_mlp():
    model = torchvision.models.swin_v2_t()
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SwinTransformerBlockV2"]
    sites = _auto(model)
    expected = [(f"{b}.{n}", "transformer") for b in blocks for n in ("norm1", "norm2")]
    assert [(s.module, s.rule) for s in sites] == expected


def test_auto_densenet_puts_asr_between_every_bn_and_relu():
    model = torchvision.models.densenet121()
    sites = _auto(model)
    assert {s.rule for s in sites} == {"norm-act"}
    assert [s.module for s in sites] == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_find_sites_lists_existing_attention():
    sites = asr_fx.find_sites(torchvision.models.mobilenet_v3_small())
    existing = [s for s in sites if s.rule == "existing"]
    assert [s.module for s in existing][:2] == ["features.1.block.1", "features.4.block.2"]
    assert len(existing) == 9 and existing[0].fold_target == "features.1.block.2.0 (input channels)"


# --- selection and errors ------------------------------------------------------------------------


def test_sites_and_exclude_by_name_and_predicate():
    model = torchvision.models.resnet18()
    chosen = asr_fx.find_sites(model, sites=["layer1.0.bn1", "layer4_1_bn2"], existing=False)
    assert [s.node for s in chosen] == ["layer1_0_bn1", "layer4_1_bn2"]
    kept = asr_fx.find_sites(model, exclude=lambda s: s.module.startswith("layer4"), existing=False)
    assert len(kept) == 6
    assert asr_fx.find_sites(model, "norm_act", exclude=["bn1"], existing=False)[0].module == "layer1.0.bn1"


@pytest.mark.parametrize(("rule", "looked_for"), [
    ("residual", "residual adds"), ("norm-act", "into an activation"), ("branch", "concatenations"),
    ("transformer", "nn.MultiheadAttention"), ("auto", "any of"),
])
def test_no_site_error_says_what_the_rule_looked_for(rule, looked_for):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(asr_fx.NoSitesError, match=looked_for) as info:
        asr_fx.instrument(model, rule=rule)
    assert "sites=" in str(info.value)


def test_unknown_rule_names_the_rules():
    with pytest.raises(ValueError, match="norm-act"):
        asr_fx.find_sites(torchvision.models.resnet18(), "vgg-ish")


# --- convert_existing ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_mobilenet():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    calibration = torch.randn(4, 3, 32, 32)
    gm = asr_fx.instrument(model, convert_existing=True, example_inputs=(calibration,))
    return model, gm, calibration


def test_convert_existing_makes_se_input_independent(converted_mobilenet):
    model, gm, _ = converted_mobilenet
    se_paths = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    keys = [p.replace(".", "_") for p in se_paths]
    assert set(keys) <= set(gm.asr.keys())
    assert not any(type(m).__name__ == "SqueezeExcitation" for m in gm.modules())
    assert find_channel_attention(trace(gm)) == []  # no input-dependent gate left
    # the same trained network: the SE's own weights, under the block's attention
    block = gm.asr[keys[0]]
    assert torch.equal(block.attention.fc1.weight, model.get_submodule(se_paths[0]).fc1.weight)
    assert block.activation == "hardsigmoid"
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    hooks = [gm.asr[k].attention.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.detach().clone()))
             for k in keys]
    gm.eval()
    with torch.no_grad():
        gm(torch.randn(1, 3, 32, 32))
        gm(torch.rand(1, 3, 32, 32) * 5 + 2)
    for h in hooks:
        h.remove()
    for k in keys:
        assert torch.equal(seen[k][0], seen[k][1]), k


def test_convert_existing_psi_starts_at_the_pooled_mean(converted_mobilenet):
    model, gm, calibration = converted_mobilenet
    feats: list[torch.Tensor] = []
    se = model.get_submodule("features.1.block.1")
    h = se.avgpool.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(calibration)
    h.remove()
    assert torch.allclose(gm.asr["features_1_block_1"].psi, feats[0].mean(0, keepdim=True))
    assert asr_fx.get_config(gm)["convert_existing"] is True


def test_convert_existing_fuses_away_the_se_blocks(converted_mobilenet, tmp_path):
    import onnx

    _, gm, _ = converted_mobilenet
    train_step(gm, torch.randn(2, 3, 32, 32))
    gm.eval()
    x = torch.randn(1, 3, 32, 32)
    fused = asr_fx.fuse(gm, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(gm(x), fused(x)) <= 1e-5
    asr_fx.export_onnx(fused, tmp_path / "m.onnx", x, reference=gm)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_mul(node, depth=6):
        if depth == 0:
            return False
        return any(n.op_type == "Mul" or reaches_mul(n, depth - 1)
                   for out in node.output for n in consumers.get(out, []))

    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    assert len(pools) == 1  # the classifier's
    assert not any(reaches_mul(p) for p in pools)


def test_convert_existing_on_hand_written_eca():
    model = ECANet().eval()
    gm = asr_fx.instrument(model, sites=["bn"], convert_existing=True)
    assert set(gm.asr.keys()) == {"bn", "eca"}
    assert gm.asr["eca"].attention.conv is not None and tuple(gm.asr["eca"].psi.shape) == (1, 16, 1, 1)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        out = gm(x)
    assert out.shape == (2, 4)


class ClassicSE(nn.Module):
    """The SE most code bases write: sizes read from x, a Linear MLP, view back, expand_as."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


def test_classic_se_with_sizes_from_x_is_found_and_converted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), ClassicSE(8), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    found = find_channel_attention(trace(model))
    assert [(a.module, a.channels, a.activation) for a in found] == [("2", 8, "sigmoid")]
    assert found[0].shape_queries
    gm = asr_fx.instrument(model, sites=["1"], convert_existing=True)
    x1, x2 = torch.randn(3, 3, 6, 6), torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert gm(x1).shape == (3, 2)
        v = gm.asr["2"].attention_value()
        assert torch.equal(v, gm.asr["2"].attention_value()) and v.shape == (8, 1, 1)
    fused = asr_fx.fuse(gm, example_inputs=(x2,))
    with torch.no_grad():
        assert rel_err(gm(x2), fused(x2)) <= 1e-5


class TimmStyleECA(nn.Module):
    """timm's EcaModule: mean without keepdim, view with x.shape[0], 1-D conv, gate, view back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.gate(self.conv(y)).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class EffectiveSE(nn.Module):
    """timm's EffectiveSEModule: mean with keepdim, one 1x1 conv, hard sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


@pytest.mark.parametrize(("block", "activation"), [(TimmStyleECA(), "sigmoid"), (EffectiveSE(8), "hardsigmoid")])
def test_timm_style_attention_is_found_and_converted(block, activation):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), block, nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).eval()
    found = find_channel_attention(trace(model))
    assert [(a.module, a.channels, a.channel_pos, a.activation) for a in found] == [("2", 8, -3, activation)]
    gm = asr_fx.instrument(model, sites=["1"], convert_existing=True)
    assert find_channel_attention(trace(gm)) == []
    x = torch.randn(2, 3, 6, 6)
    fused = asr_fx.fuse(gm, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(gm(x), fused(x)) <= 1e-5


# --- asr-fx inspect ------------------------------------------------------------------------------


def test_inspect_factory_prints_every_site(capsys):
    from asr_fx.cli import main

    assert main(["inspect", "torchvision.models:shufflenet_v2_x0_5"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("node"))
    for column in ("module", "rule", "channel dim", "channels", "folds into", "can fold"):
        assert column in header
    assert "19 site(s) with rule 'auto'" in out
    row = next(line for line in out.splitlines() if line.startswith("stage2_0_branch2_6 "))
    assert row.split() == ["stage2_0_branch2_6", "stage2.0.branch2.6", "branch", "-3", "24", "stage2.0.branch2.6",
                           "yes"]


def test_inspect_checkpoint_and_json(tmp_path, capsys):
    import json

    from asr_fx.cli import main

    model = asr_fx.build("torchvision.models:resnet18", num_classes=10)
    asr_fx.save(asr_fx.instrument(model), tmp_path / "ckpt.pt", input_shape=[1, 3, 32, 32])
    assert main(["inspect", str(tmp_path / "ckpt.pt"), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert [s["module"] for s in sites] == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]
    assert main(["inspect", "torchvision.models:resnet18", "--rule", "branch"]) == 0
    assert "no site with rule 'branch': it looks for concatenations" in capsys.readouterr().out
    assert main(["inspect", "torchvision.models:resnet18", "--rule", "nope"]) == 2


class SEBasicBlock(nn.Module):
    """A residual block whose branch ends in an SE block (SE-ResNet): bn2 -> SE -> add."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.se = ClassicSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.se(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def test_residual_site_is_the_last_norm_behind_an_se_block():
    model = nn.Sequential(SEBasicBlock(), SEBasicBlock())
    sites = asr_fx.find_sites(model)
    assert [(s.module, s.rule) for s in sites] == [("0.bn2", "residual"), ("1.bn2", "residual"),
                                                   ("0.se", "existing"), ("1.se", "existing")]


def test_spatial_attention_and_channel_means_are_not_channel_attention():
    class SpatialGate(nn.Module):  # CBAM's spatial gate: pooled over channels, not over space
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.conv(x.mean(1, keepdim=True)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3), SpatialGate())
    assert find_channel_attention(trace(model)) == []


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_y_400mf"])
def test_convert_existing_fuses_se_away_in_other_families(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = asr_fx.instrument(model, convert_existing=True, example_inputs=(x,))
    perturb_asr(gm)  # psi and the converted networks' weights move away from the trained values
    gm.eval()
    fused = asr_fx.fuse(gm, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(gm(x), fused(x)) <= 1e-5
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("AdaptiveAvgPool2d") == 1  # the classifier's; every SE pooling is gone
    assert "Sigmoid" not in kinds and find_channel_attention(fused) == []
    assert asr_fx.fusion_report(fused).unfolded == []

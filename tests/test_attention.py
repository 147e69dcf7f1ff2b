"""Issue 3: attention networks on psi (SE, ECA, SRM, IE, SPA, CBAM), the registry and the paper's options."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, ORT_RTOL, fuse_and_check, n_params, perturb_asr, rel_err, train_step
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import asr_fx
from asr_fx import attention
from asr_fx.asr import ASR, PRESETS
from asr_fx.errors import StateDictMismatchError
from asr_fx.models import cifar_resnet
from asr_fx.passes import trace
from asr_fx.state_dicts import check_keys
from testkit import attention_costs

BUILT_IN = ["se", "eca", "srm", "ie", "spa", "cbam"]
#: the psi form each module documents, for C channels
PSI_SHAPES = {
    "se": lambda c: (1, c, 1, 1),
    "eca": lambda c: (1, c, 1, 1),
    "srm": lambda c: (1, c, 2),
    "ie": lambda c: (1, c, 1, 1),
    "spa": lambda c: (1, c, 21),
    "cbam": lambda c: (2, c, 1, 1),
}
X = (2, 3, 16, 16)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return cifar_resnet(depth=11).eval()


def _asr_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("asr.")}


def _assert_every_site_folded_into_bn(fused: nn.Module, n_blocks: int, own_muls: int = 0) -> None:
    """Every ASR block's scale went into a BN and none is left; muls inside an attention network
    (SRM's ``z * gamma``) are constant-folded away and only show up as records, never as Muls.
    ``own_muls``: the model's own muls (its own SE), which stay."""
    report = asr_fx.fusion_report(fused)
    assert [r.where for r in report.folded] == ["bn"] * n_blocks
    assert report.unfolded == []
    graph = (fused if isinstance(fused, torch.fx.GraphModule) else trace(fused)).graph  # the user's class: traced
    muls = [n for n in graph.nodes if n.op in ("call_function", "call_method") and "mul" in str(n.target)]
    assert len(muls) == own_muls


# --- the registry -------------------------------------------------------------------------------


def test_the_papers_attentions_are_registered():
    assert set(BUILT_IN) <= set(attention.names())


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(attention.UnknownAttentionError) as info:
        attention.create("no-such-attention", 16)
    message = str(info.value)
    assert "no-such-attention" in message and "register" in message
    assert all(name in message for name in attention.names())
    assert isinstance(info.value, asr_fx.ASRError) and isinstance(info.value, ValueError)
    with pytest.raises(attention.UnknownAttentionError, match="registered: .*se"):
        asr_fx.instrument(_resnet(), attention="no-such-attention")


def test_a_factory_without_psi_shape_is_refused():
    with pytest.raises(TypeError, match="psi_shape"):
        attention.create(lambda c: nn.Identity(), 8)


class ChannelGate(nn.Module):
    """A user's attention: psi (1, C, 1, 1) -> per-channel affine."""

    def __init__(self, channels: int, scale: float = 2.0) -> None:
        super().__init__()
        self.psi_shape = (1, channels, 1, 1)
        self.weight = nn.Parameter(torch.full((1, channels, 1, 1), scale))

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi * self.weight


@pytest.mark.parametrize("by", ["name", "class"])
def test_a_user_attention_works_end_to_end(by):
    attention.register("test_channel_gate", ChannelGate)
    try:
        vanilla = _resnet()
        spec = "test_channel_gate" if by == "name" else ChannelGate
        model = asr_fx.instrument(vanilla, attention=spec, attention_kwargs={"scale": 3.0})
        blocks = [m for m in model.modules() if isinstance(m, ASR)]
        assert blocks and all(isinstance(b.attention, ChannelGate) for b in blocks)
        assert all(torch.all(b.attention.weight == 3.0) for b in blocks)
        before = _asr_state(model)
        train_step(model, torch.randn(X))
        after = _asr_state(model)
        assert all(not torch.equal(before[k], after[k]) for k in before)
        fuse_and_check(model, torch.randn(X), vanilla)
        name = asr_fx.get_config(model)["attention"]
        assert name == ("test_channel_gate" if by == "name" else f"{__name__}:ChannelGate")
    finally:
        attention.unregister("test_channel_gate")
    assert "test_channel_gate" not in attention.names()


class HalfGate(ChannelGate):
    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi[:, ::2] * self.weight[:, ::2]


def test_an_attention_with_the_wrong_output_size_is_refused_at_instrument():
    with pytest.raises(ValueError, match="must return one value per channel"):
        asr_fx.instrument(_resnet(), attention=HalfGate)


def test_register_refuses_to_overwrite_silently():
    with pytest.raises(ValueError, match="overwrite=True"):
        attention.register("se", ChannelGate)


# --- every built-in attention: shape, gradients, training, fusion ---------------------------------


@pytest.mark.parametrize("name", BUILT_IN)
def test_psi_form_and_output_shape(name):
    net = attention.create(name, 256)
    assert tuple(net.psi_shape) == PSI_SHAPES[name](256)
    raw = net(torch.full(net.psi_shape, 0.1))
    assert raw.numel() == 256 and torch.isfinite(raw).all()
    block = ASR(256, attention.create(name, 256))
    assert block.attention_value().shape == (256, 1, 1)
    tokens_last = ASR(256, attention.create(name, 256), channel_pos=-1)
    assert tokens_last.attention_value().shape == (256,)
    assert tokens_last(torch.randn(2, 5, 256)).shape == (2, 5, 256)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("psi_init", [0.1, ("normal", 1.0)], ids=["constant", "normal"])
def test_gradients_reach_psi_and_every_attention_parameter(name, psi_init):
    torch.manual_seed(0)
    # 128 channels: 8 hidden units at the paper's r = 16 (at 32 channels SPA's two bias-free ReLU units
    # on a constant psi may both start below zero, and then nothing upstream of them gets a gradient)
    block = ASR(128, attention.create(name, 128), psi_init=psi_init)
    x = torch.randn(2, 128, 4, 4)
    (block(x) * torch.randn_like(x)).sum().backward()
    assert block.psi.grad is not None and block.psi.grad.abs().sum() > 0
    assert torch.isfinite(block.psi.grad).all()
    for pname, p in block.attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.fixture(scope="module", params=BUILT_IN)
def trained(request):
    vanilla = _resnet()
    model = asr_fx.instrument(vanilla, attention=request.param)
    before = _asr_state(model)
    torch.manual_seed(1)
    train_step(model, torch.randn(X))
    return request.param, vanilla, model, before


def test_a_training_step_changes_psi_and_theta(trained):
    name, _, model, before = trained
    after = _asr_state(model)
    psi = [k for k in before if k.endswith(".psi")]
    theta = [k for k in before if ".attention." in k]
    assert psi and theta
    assert all(not torch.equal(before[k], after[k]) for k in psi), name
    assert all(not torch.equal(before[k], after[k]) for k in theta), name


def test_fuse_matches_and_adds_no_parameters(trained):
    name, vanilla, model, _ = trained
    model = __import__("copy").deepcopy(model)
    perturb_asr(model)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(X)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL, name
    assert n_params(fused) == n_params(vanilla) < n_params(model)
    assert not any(n.startswith("asr") for n, _ in fused.named_modules())
    _assert_every_site_folded_into_bn(fused, len(asr_fx.get_config(model)["sites"]))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(BUILT_IN), channels=st.integers(1, 300), psi=st.floats(-3, 3))
def test_every_attention_gives_c_finite_values_for_any_width(name, channels, psi):
    net = attention.create(name, channels)
    out = net(torch.full(net.psi_shape, psi))
    assert out.numel() == channels and torch.isfinite(out).all()


def test_attention_table_tool_measures_zero_added_after_fusion():
    c, h = 32, 2  # the paper's r = 16: round(32 / 16) hidden units
    theta = {"se": 2 * c * h + h + c, "eca": 3, "srm": 4 * c, "ie": 2 * c, "spa": c * 21 * h + h * c,
             "cbam": 2 * c * h}
    for name in BUILT_IN:
        row = attention_costs.measure(name, c)
        psi_size = torch.Size(PSI_SHAPES[name](c)).numel()
        assert row["added after fusion"] == 0, name
        assert row["added in training"] == psi_size + theta[name], name
        assert float(row["fuse error"]) <= FUSE_RTOL


def test_state_dict_round_trip(trained):
    name, vanilla, model, _ = trained
    fresh = asr_fx.instrument(vanilla, attention=name).eval()
    fresh.load_state_dict(model.state_dict())
    model.eval()
    x = torch.randn(X)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x)), name


def test_srm_never_computes_a_std_and_stays_finite():
    net = attention.create("srm", 8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    net.train()
    out = net(torch.zeros(net.psi_shape))  # a batch of one: BatchNorm would refuse or degenerate
    assert torch.isfinite(out).all()
    ref_start = attention.create("srm", 8, cfc_init=0.0)
    assert torch.all(ref_start.cfc == 0)


def test_spa_psi_has_one_entry_per_pooled_cell():
    assert attention.create("spa", 4, scales=(1, 3)).psi_shape == (1, 4, 1 + 9)
    with pytest.raises(ValueError, match="scales"):
        attention.create("spa", 4, scales=(0,))


def test_eca_kernel_size_follows_the_channels():
    from asr_fx.attention.eca import eca_kernel_size

    assert [eca_kernel_size(c) for c in (16, 64, 256, 512)] == [3, 3, 5, 5]
    assert sum(p.numel() for p in attention.create("eca", 256).parameters()) == 5


# --- the paper's options --------------------------------------------------------------------------


def test_delta_three_stacks_blocks_and_fuses_to_the_vanilla_count():
    vanilla = _resnet()
    model = asr_fx.instrument(vanilla, delta=3)
    sites = asr_fx.get_config(model)["sites"]
    for site in sites:
        stack = model.asr[site["node"]]
        assert isinstance(stack, nn.Sequential) and len(stack) == 3 and all(isinstance(b, ASR) for b in stack)
    train_step(model, torch.randn(X))
    perturb_asr(model)
    fused = fuse_and_check(model, torch.randn(X), vanilla)
    _assert_every_site_folded_into_bn(fused, 3 * len(sites))
    with pytest.raises(ValueError, match="delta"):
        asr_fx.instrument(vanilla, delta=0)


def test_fixed_psi_is_a_buffer_and_does_not_move():
    vanilla = _resnet()
    model = asr_fx.instrument(vanilla, learnable_psi=False)
    assert not any(name.endswith(".psi") for name, _ in model.named_parameters())
    psis = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".psi")}
    assert psis and all(not v.requires_grad for v in psis.values())
    theta = _asr_state(model)
    train_step(model, torch.randn(X))
    state = model.state_dict()
    assert all(torch.equal(psis[k], state[k]) for k in psis)
    after = _asr_state(model)
    assert all(not torch.equal(theta[k], after[k]) for k in theta)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    assert n_params(fused) == n_params(vanilla)


def test_psi_init_constant_and_normal():
    block = ASR(64, attention.create("se", 64), psi_init=0.3)
    assert torch.all(block.psi == 0.3)
    torch.manual_seed(0)
    block = ASR(4096, attention.create("ie", 4096), psi_init=("normal", 0.5))
    assert abs(block.psi.std().item() - 0.5) < 0.05 and abs(block.psi.mean().item()) < 0.05
    with pytest.raises(ValueError, match="psi_init"):
        ASR(8, attention.create("se", 8), psi_init=("uniform", 1.0))
    model = asr_fx.instrument(_resnet(), psi_init=("normal", 0.2))
    assert asr_fx.get_config(model)["psi_init"] == ["normal", 0.2]


@pytest.mark.parametrize("activation, low, high", [("sigmoid", 0, 1), ("tanh", -1, 1), ("hardsigmoid", 0, 1)])
def test_activations_bound_v_and_fuse(activation, low, high):
    vanilla = _resnet()
    model = asr_fx.instrument(vanilla, activation=activation)
    perturb_asr(model)
    model.eval()
    for block in (m for m in model.modules() if isinstance(m, ASR)):
        v = block.attention_value()
        assert block.activation == activation and low <= v.min() and v.max() <= high
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(X)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    with pytest.raises(ValueError, match="unknown activation"):
        asr_fx.instrument(vanilla, activation="relu")


def test_transformer_preset_is_the_papers_vit_setting():
    model = asr_fx.instrument(_resnet(), attention="se", preset="transformer")
    config = asr_fx.get_config(model)
    assert config["preset"] == "transformer" and config["activation"] == "tanh" and config["psi_init"] == 1e-3
    blocks = [m for m in model.modules() if isinstance(m, ASR)]
    assert blocks
    for block in blocks:
        assert block.activation == "tanh" and torch.all(block.psi == 1e-3)
        assert all(torch.all(p == 1e-3) for p in block.attention.parameters())
    assert PRESETS["transformer"] == {"activation": "tanh", "psi_init": 1e-3, "attention_init": 1e-3}


def test_preset_conflicts_and_unknown_presets_are_refused():
    with pytest.raises(ValueError, match="drop one"):
        asr_fx.instrument(_resnet(), preset="transformer", activation="hardsigmoid")
    with pytest.raises(ValueError, match="unknown preset .*transformer"):
        asr_fx.instrument(_resnet(), preset="vit-ish")
    model = asr_fx.instrument(_resnet(), preset="transformer", activation="tanh")  # the preset's own value
    assert asr_fx.get_config(model)["activation"] == "tanh"


def test_preset_survives_a_checkpoint(tmp_path):
    vanilla = asr_fx.build("asr_fx.models:cifar_resnet", depth=11)
    model = asr_fx.instrument(vanilla, attention="srm", preset="transformer")
    train_step(model, torch.randn(X))
    model.eval()
    asr_fx.save(model, tmp_path / "ckpt.pt")
    loaded = asr_fx.load(tmp_path / "ckpt.pt").eval()
    assert asr_fx.get_config(loaded)["preset"] == "transformer"
    x = torch.randn(X)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


# --- ASR(k) + k: a model that already has channel attention keeps it -----------------------------


class SqueezeExciteOnX(nn.Module):
    """A model's own SE: GAP(x) -> conv -> ReLU -> conv -> sigmoid -> x * v."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(max(channels // 4, 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))


class SEBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = SqueezeExciteOnX(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.se(self.bn2(self.conv2(y))) + x)


class SEResNet(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*(SEBlock(width) for _ in range(blocks)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@pytest.mark.parametrize("name", ["se", "srm"])
def test_asr_plus_the_models_own_se_keeps_it_and_fuses(name):
    torch.manual_seed(0)
    vanilla = SEResNet().eval()
    sites = ["blocks.0.bn2", "blocks.1.bn2"]  # explicit: the model's SE sits between bn2 and the add
    model = asr_fx.instrument(vanilla, attention=name, sites=sites)
    assert [s["module"] for s in asr_fx.get_config(model)["sites"]] == sites
    train_step(model, torch.randn(X))
    perturb_asr(model)
    fused = fuse_and_check(model, torch.randn(X), vanilla)
    modules = dict(fused.named_modules())
    assert all(f"blocks.{i}.se.fc{j}" in modules for i in (0, 1) for j in (1, 2))  # its own SE stays
    assert not any(n.startswith("asr") for n in modules)
    _assert_every_site_folded_into_bn(fused, 2, own_muls=2)  # the model's SE: x * sigmoid(...)


# --- ONNX, only as a slow sweep: fused graphs of every attention have the vanilla op multiset ----


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_attention_exports_with_the_vanilla_ops(name, tmp_path):
    vanilla = _resnet()
    model = asr_fx.instrument(vanilla, attention=name)
    perturb_asr(model)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(1, 3, 16, 16)
    ref = asr_fx.export_onnx(vanilla, tmp_path / "vanilla.onnx", x)
    report = asr_fx.export_onnx(fused, tmp_path / "fused.onnx", x, reference=model, rtol=ORT_RTOL)
    assert report.verified and report.ok and report.op_counts == ref.op_counts
    assert report.param_count == n_params(vanilla)


def test_the_keys_of_each_built_in_attention_name_it_and_no_other():
    """A state_dict's asr.* blocks are recognised by key names and shapes (at the widths they have, delta 1 or 2);
    the wrong network is named in the key-mismatch error, a custom one matches nothing."""
    for name in attention.names():
        for delta in (1, 2):
            model = asr_fx.instrument(cifar_resnet(depth=11, num_classes=10), attention=name, delta=delta,
                                      example_inputs=(torch.zeros(1, 3, 32, 32),))
            assert attention.matching_attention(model.state_dict()) == name, (name, delta)
    old = asr_fx.instrument(cifar_resnet(depth=11, num_classes=10), attention_kwargs={"hidden": 8},
                            example_inputs=(torch.zeros(1, 3, 32, 32),))
    assert attention.matching_attention(old.state_dict()) == "se"  # widths read from the state_dict
    assert attention.matching_attention(cifar_resnet(depth=11, num_classes=10).state_dict()) is None
    sd = old.state_dict()
    sd["asr.layer1_0_bn3.attention.extra"] = torch.zeros(3)
    assert attention.matching_attention(sd) is None

    eca = asr_fx.instrument(cifar_resnet(depth=11, num_classes=10), attention="eca",
                            example_inputs=(torch.zeros(1, 3, 32, 32),))
    with pytest.raises(StateDictMismatchError, match="look like the attention network 'se', not 'eca'") as info:
        check_keys(eca, old.state_dict(), attention="eca")
    assert info.value.attention == "se" and info.value.asr_keys and info.value.reason == "keys"
    with pytest.raises(StateDictMismatchError) as info:  # no attention named: no guess
        check_keys(eca, old.state_dict())
    assert info.value.attention is None and "missing key(s)" in str(info.value)

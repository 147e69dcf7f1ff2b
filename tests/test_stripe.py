"""The Stripe Observation tools: collect, freeze_attention (then fuse), the figures and `asr-fx stripe`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import FUSE_RTOL, n_params, rel_err, train_step
from torch import nn

import asr_fx
from asr_fx import freeze as freezing
from asr_fx import stripe
from asr_fx.errors import AttentionNetworkError, InvalidOptionError, NoSitesError


class SE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, 4, 1)
        self.fc2 = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class ECA(nn.Module):
    """ECA: a 1-D conv across channels; the gate is reshaped and expanded to x's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).unsqueeze(1))
        return x * torch.sigmoid(y).transpose(-1, -2).unsqueeze(-1).expand_as(x)


class Block(nn.Module):
    """A residual block with its attention after the last BN of the branch (SE-ResNet's place)."""

    def __init__(self, c: int, attention: str | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.att = {"se": lambda: SE(c), "eca": ECA, None: nn.Identity}[attention]()

    def forward(self, x):
        return F.relu(x + self.att(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


class TinyNet(nn.Module):
    def __init__(self, attention: str | None = "se", widths=(8, 12)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.b1 = Block(widths[0], attention)
        self.down = nn.Conv2d(widths[0], widths[1], 1)
        self.b2 = Block(widths[1], attention)
        self.fc = nn.Linear(widths[1], 5)

    def forward(self, x):
        x = self.b2(self.down(self.b1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_net(attention: str | None = "se") -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet(attention)
    with torch.no_grad():  # trained-looking BN statistics and scales
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, SE):
                m.fc2.weight.mul_(20)  # attention that visibly depends on the input
    return model.eval()


def make_batches(sizes=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g) for n in sizes]


@pytest.fixture(scope="module")
def se_model():
    return tiny_net("se")


def test_collect_returns_values_and_pooled_features_per_input(se_model):
    se_model.train()
    stats = stripe.collect(se_model, [(x, torch.zeros(len(x))) for x in make_batches((5, 3))])
    assert se_model.training and all(m.training for m in se_model.modules())  # flags restored
    assert [s.site for s in stats] == ["b1.att", "b2.att"]
    for site, c in zip(stats, (8, 12)):
        assert site.values.shape == (8, c) and site.pooled.shape == (8, c)
        assert site.mean.shape == site.std.shape == site.feature_std.shape == (c,)
        assert ((site.values > 0) & (site.values < 1)).all()
        assert (site.std > 0).all() and (site.feature_std > 0).all()
        assert site.std_ratio == pytest.approx(float(site.std.mean() / site.feature_std.mean()))
    # the recorded values are what the attention computes
    x = torch.cat(make_batches((5, 3)))
    captured = {}
    handle = se_model.b1.att.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    with torch.no_grad():
        se_model.eval()(x)
    handle.remove()
    pooled = captured["x"].mean((2, 3))
    assert torch.allclose(stats[0].pooled, pooled, atol=1e-6)
    expected = torch.sigmoid(se_model.b1.att.fc2(F.relu(se_model.b1.att.fc1(pooled[..., None, None])))).flatten(1)
    assert torch.allclose(stats["b1.att"].values, expected, atol=1e-6)
    assert "std ratio" in stats.table() and len(stats.to_dict()["sites"]) == 2


def test_max_inputs_stops_early(se_model):
    stats = stripe.collect(se_model, make_batches((4, 4, 4)), max_inputs=6)
    assert stats[0].values.shape[0] == 6


def test_attention_with_a_constant_output_has_std_zero():
    model = tiny_net("se")
    with torch.no_grad():
        model.b1.att.fc2.weight.zero_()  # v = sigmoid(fc2.bias), whatever the input
    stats = stripe.collect(model, make_batches((6, 6)))
    constant = stats["b1.att"]
    # 0 up to float rounding: torch's vectorised and scalar sigmoid may differ by an ulp on one value
    assert constant.std.abs().max() <= 1e-7
    assert torch.allclose(constant.mean, torch.sigmoid(model.b1.att.fc2.bias), atol=1e-7)
    assert (constant.feature_std > 0).all() and constant.std_ratio <= 1e-6
    assert (stats["b2.att"].std > 0).all()


def test_freezing_constant_attention_changes_nothing():
    model = tiny_net("se")
    with torch.no_grad():
        for block in (model.b1, model.b2):
            block.att.fc2.weight.zero_()
    frozen = freezing.freeze_attention(model, make_batches((6,)), held_out=make_batches((4,), seed=3))
    report = freezing.freeze_report(frozen)
    assert all(s.ignored_std_max <= 1e-7 for s in report.sites) and len(report.sites) == 2
    assert report.output_change["rel"] <= FUSE_RTOL and report.output_change["argmax_agreement"] == 1.0


def _replaced_by_mean(model: nn.Module, stats: stripe.StripeStats) -> nn.Module:
    """The reference for a frozen model: every SE module's output is x * (its mean v)."""
    import copy

    ref = copy.deepcopy(model)

    class Const(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.register_buffer("v", v.reshape(1, -1, 1, 1))

        def forward(self, x):
            return x * self.v

    for name in ("b1", "b2"):
        getattr(ref, name).att = Const(stats[f"{name}.att"].mean)
    return ref.eval()


@pytest.fixture(scope="module")
def frozen_and_fused(se_model):
    calibration, held_out = make_batches((6, 6)), make_batches((5,), seed=1)
    frozen = freezing.freeze_attention(se_model, calibration, held_out=held_out)
    return frozen, asr_fx.fuse(frozen, strict=True), stripe.collect(se_model, calibration)


def test_freeze_replaces_attention_by_its_mean(se_model, frozen_and_fused):
    frozen, _, stats = frozen_and_fused
    x = make_batches((7,), seed=2)[0]
    reference = _replaced_by_mean(se_model, stats)
    with torch.no_grad():
        assert rel_err(reference(x), frozen(x)) <= FUSE_RTOL
    assert not any(isinstance(m, (SE, nn.AdaptiveAvgPool2d)) for m in frozen.modules())
    assert not any(n.target is torch.sigmoid for n in frozen.graph.nodes)
    report = freezing.freeze_report(frozen)
    assert [s.site for s in report.sites] == ["b1.att", "b2.att"] and report.data == "held-out"
    for site, s in zip(report.sites, stats):
        assert site.ignored_std_mean == pytest.approx(float(s.std.mean()))
        assert site.ignored_std_max == pytest.approx(float(s.std.max()))
        assert site.buffer.startswith(stripe.FROZEN_PREFIX)
    change = report.output_change
    assert set(change) == {"max_abs", "rel", "argmax_agreement"} and change["max_abs"] > 0
    with torch.no_grad():
        held = make_batches((5,), seed=1)[0]
        assert change["max_abs"] == pytest.approx(float((se_model(held) - frozen(held)).abs().max()), rel=1e-5)
    assert "ignored std" in report.table() and "held-out" in report.table()


def test_freeze_then_fuse_matches_frozen_with_the_vanilla_parameter_count(frozen_and_fused):
    frozen, fused, _ = frozen_and_fused
    x = make_batches((7,), seed=2)[0]
    with torch.no_grad():
        assert rel_err(frozen(x), fused(x)) <= FUSE_RTOL
    assert n_params(fused) == n_params(TinyNet(attention=None))
    fusion = asr_fx.fusion_report(fused)
    assert [r.where for r in fusion.records] == ["bn", "bn"] and all(r.from_attention for r in fusion.records)
    assert not any(n.op == "get_attr" and "stripe" in str(n.target) for n in fused.graph.nodes)


def test_freeze_does_not_change_the_model(se_model):
    before = {k: v.clone() for k, v in se_model.state_dict().items()}
    freezing.freeze_attention(se_model, make_batches((4,)))
    assert all(torch.equal(before[k], v) for k, v in se_model.state_dict().items())
    assert isinstance(se_model.b1.att, SE)


def test_eca_with_an_expanded_gate_freezes_and_fuses():
    model = tiny_net("eca")
    stats = stripe.collect(model, make_batches((4, 4)))
    assert [s.channels for s in stats] == [8, 12]
    frozen = freezing.freeze_attention(model, make_batches((4, 4)), stats=stats)
    fused = asr_fx.fuse(frozen, strict=True)
    x = make_batches((3,), seed=5)[0]
    with torch.no_grad():
        assert rel_err(frozen(x), fused(x)) <= FUSE_RTOL
    assert n_params(fused) == n_params(TinyNet(attention=None))


class SharedSE(nn.Module):
    """One SE module applied at two places: two sites, two constants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se = SE(8)

    def forward(self, x):
        x = F.relu(self.se(self.bn1(self.conv1(x))))
        return self.se(self.bn2(self.conv2(x))).mean((2, 3))


def test_an_attention_module_called_twice_gives_two_sites_and_two_constants():
    torch.manual_seed(0)
    model = SharedSE().eval()
    stats = stripe.collect(model, make_batches((4,)))
    assert [s.site for s in stats] == ["se", "se#2"]
    frozen = freezing.freeze_attention(model, make_batches((4,)), stats=stats)
    assert len({s.buffer for s in freezing.freeze_report(frozen).sites}) == 2
    fused = asr_fx.fuse(frozen, strict=True)
    x = make_batches((3,), seed=4)[0]
    with torch.no_grad():
        assert rel_err(frozen(x), fused(x)) <= FUSE_RTOL
    assert n_params(fused) == n_params(model) - n_params(model.se)


def test_plain_attention_puts_input_dependent_se_at_the_asr_sites():
    model = stripe.plain_attention(TinyNet(attention=None), "se")
    assert asr_fx.get_config(model) is None  # not an ASR model: save() refuses it
    train_step(model, make_batches((8,))[0])
    stats = stripe.collect(model, make_batches((5, 3)))
    assert [(s.site, s.channels) for s in stats] == [("asr.b1_bn2", 8), ("asr.b2_bn2", 12)]
    assert all((s.std > 0).all() for s in stats)
    fused = asr_fx.fuse(freezing.freeze_attention(model, make_batches((5,))), strict=True)
    assert n_params(fused) == n_params(TinyNet(attention=None))
    with pytest.raises(AttentionNetworkError, match="one pooled descriptor, not a batch"):
        stripe.plain_attention(TinyNet(attention=None), "eca")
    with pytest.raises(AttentionNetworkError, match="no plain pooled form"):
        stripe.plain_attention(TinyNet(attention=None), "srm")


def test_a_model_without_attention_is_refused_with_the_pattern_named():
    with pytest.raises(NoSitesError, match="sigmoid/hardsigmoid"):
        stripe.collect(TinyNet(attention=None), make_batches((2,)))
    with pytest.raises(InvalidOptionError, match="no batches"):
        stripe.collect(tiny_net("se"), [])
    with pytest.raises(InvalidOptionError, match="a batch must be"):
        stripe.collect(tiny_net("se"), ["not a tensor"])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_torchvision_squeeze_excitation_is_collected_and_frozen(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    se_blocks = {n: m for n, m in model.named_modules() if isinstance(m, torchvision.ops.SqueezeExcitation)}
    batches = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    stats = stripe.collect(model, batches)
    assert [s.site for s in stats] == list(se_blocks)
    assert [s.channels for s in stats] == [m.fc1.in_channels for m in se_blocks.values()]
    assert all(s.values.shape == (4, s.channels) for s in stats)
    if name != "mobilenet_v3_small":
        return  # one freeze through fuse is enough: the others take the same path
    frozen = freezing.freeze_attention(model, batches, stats=stats, held_out=batches[:1])
    assert not any(isinstance(m, torchvision.ops.SqueezeExcitation) for m in frozen.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = asr_fx.fuse(frozen)
    fusion = asr_fx.fusion_report(fused)
    # SE scales a Hardswish/ReLU output here: each frozen site is folded somewhere or reported, never dropped
    attention_records = [r for r in fusion.records if r.from_attention]
    assert len(attention_records) == len(se_blocks)
    assert all(r.folded or r.reason for r in attention_records)
    if fusion.unfolded:
        assert any("could not be folded" in str(w.message) for w in caught)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(frozen(x), fused(x)) <= FUSE_RTOL


def test_figures_are_written(se_model, tmp_path):
    from asr_fx import plot

    batches = make_batches((6, 6))
    stats = stripe.collect(se_model, batches)
    runs = [stats]
    model = tiny_net("se")
    for step in range(3):  # three "checkpoints": weights moved a little each time
        with torch.no_grad():
            model.b1.att.fc2.bias.add_(0.1 * (step + 1))
        runs.append(stripe.collect(model, batches))
    over = stripe.values_over_checkpoints(runs, "b1.att")
    assert over.shape == (4, 12, 8)
    paths = plot.plot_all(stats, tmp_path, site="b1.att", over_epochs=over, epochs=[0, 1, 2, 3])
    assert [p.name for p in paths] == ["stripes.png", "std_histogram.png", "epoch_difference.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 100_000
    with pytest.raises(InvalidOptionError, match="at least two checkpoints"):
        stripe.values_over_checkpoints(runs[:1])


def test_cli_stripe_writes_figures_and_summary(tmp_path, capsys):
    from asr_fx import cli

    if "stripe" not in [command.NAME for command in cli.COMMANDS]:
        pytest.fail("asr_fx.cli.stripe is not registered in asr_fx.cli.COMMANDS")
    for i in range(3):
        model = tiny_net("se")
        with torch.no_grad():
            model.b1.att.fc2.bias.add_(0.2 * i)
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / f"e{i}.pt")
    out = tmp_path / "out"
    code = cli.main(["stripe", "test_stripe:tiny_net", "--data", "random", "--input-shape", "4,3,8,8",
                     "--batches", "2", "-o", str(out),
                     "--checkpoints", ",".join(str(tmp_path / f"e{i}.pt") for i in range(3)),
                     "--model", "test_stripe:tiny_net", "--site", "b1.att"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert {p.name for p in out.iterdir()} == {"stripes.png", "std_histogram.png", "epoch_difference.png", "summary.md"}
    assert "b2.att" in printed and "std ratio" in (out / "summary.md").read_text()
    torch.save((torch.randn(10, 3, 8, 8), torch.zeros(10)), tmp_path / "inputs.pt")
    code = cli.main(["stripe", "test_stripe:tiny_net", "--data", str(tmp_path / "inputs.pt"), "-o", str(out),
                     "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [s["inputs"] for s in report["sites"]] == [10, 10]
    assert "weights are random" in report["note"]  # a factory MODEL: the numbers mean nothing
    assert "weights are random" in (out / "summary.md").read_text()
    code = cli.main(["stripe", "test_stripe:tiny_net", "--data", "random", "--input-shape", "4,3,8,8",
                     "-o", str(out), "--site", "nowhere"])
    assert code == 2 and "no attention site 'nowhere'" in capsys.readouterr().err
    code = cli.main(["stripe", str(tmp_path / "e0.pt"), "--data", "random", "-o", str(out)])
    assert code == 2 and "--model" in capsys.readouterr().err


def test_per_site_output_change_freezes_one_site_at_a_time(se_model):
    calibration, held_out = make_batches((6, 6)), make_batches((5,), seed=1)
    stats = stripe.collect(se_model, calibration)
    frozen = freezing.freeze_attention(se_model, calibration, held_out=held_out, stats=stats, per_site=True)
    report = freezing.freeze_report(frozen)
    for record, site in zip(report.sites, stats):
        alone = freezing.freeze_attention(se_model, calibration, held_out=held_out, stats=stripe.StripeStats([site]))
        assert record.output_change["max_abs"] == pytest.approx(freezing.freeze_report(alone).output_change["max_abs"])
        assert record.output_change["rel"] > 0
    assert "this site alone" in report.table()


def test_frozen_constants_follow_the_models_dtype():
    model = TinyNet().double().eval()
    batches = [x.double() for x in make_batches((4,))]
    frozen = freezing.freeze_attention(model, batches)
    buffers = [getattr(frozen, s.buffer) for s in freezing.freeze_report(frozen).sites]
    assert buffers and all(b.dtype == torch.float64 for b in buffers)
    fused = asr_fx.fuse(frozen, strict=True)
    assert {p.dtype for p in fused.parameters()} == {torch.float64}

"""Capture of real forwards, one small hand-written model per failure category (issue 13).

Composite norm-act layers, training flags, shape checks, list inputs, keyword-only flags, the
equivalence check, and that a fold never crosses an activation hidden in a layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asr_fx
from asr_fx.equivalence import check_fused
from asr_fx.errors import EquivalenceError, NoSitesError, TraceError
from asr_fx.passes import trace
from asr_fx.passes.capture.concrete_values import state_kept
from asr_fx.passes.forms.module_form import attachments


class NormAct(nn.BatchNorm2d):
    """A BatchNorm with its activation inside (like timm's BatchNormAct2d): F.batch_norm then SiLU."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.na1 = NormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.na2 = NormAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.na2(self.conv2(self.na1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _randomize(model: nn.Module) -> None:
    """Move every psi and BN statistic away from its start so that folds are visible."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def test_norm_act_layer_is_traced_through_with_the_site_between_norm_and_activation():
    torch.manual_seed(0)
    model = NormActNet().train()
    x = torch.randn(4, 3, 8, 8)
    gm = asr_fx.instrument(model, example_inputs=(x,))
    sites = asr_fx.get_config(gm)["sites"]
    assert [(s["node"], s["rule"]) for s in sites] == [("na1", "norm-act"), ("na2", "norm-act")]
    # the model's own composite layer, its norm output scaled in place (the site between norm and act)
    assert type(gm.na1) is NormAct and isinstance(gm.na1.act, nn.SiLU)
    assert sorted(a.kind for a in attachments(gm)) == ["affine", "affine"]
    assert set(model.state_dict()) <= set(gm.state_dict())  # keys unchanged
    _randomize(gm)
    gm.eval()
    with torch.no_grad():
        alone = gm(x[:1])
        assert torch.allclose(gm(x)[:1], alone, atol=1e-6), "eval output depends on the rest of the batch"
        fused = asr_fx.fuse(gm, strict=True)
        ref = gm(x)
        assert (fused(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    gm.train()
    before = gm.na1.num_batches_tracked.item()
    gm(x)
    assert gm.na1.num_batches_tracked.item() == before + 1  # the plain BN counts, once


def test_a_composite_leaf_is_never_a_fold_target():
    model = NormActNet().eval()
    with pytest.raises(NoSitesError):  # the norm's output is behind SiLU: no site there
        asr_fx.instrument(model, leaf_modules=[NormAct])

    class Scaled(NormActNet):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

        def forward(self, x):
            x = self.na1(self.conv1(x)) * self.scale  # a constant scale after the hidden SiLU
            return self.fc(self.na2(self.conv2(x)).mean((2, 3)))

    scaled = Scaled().eval()
    _randomize(scaled)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(scaled, leaf_modules=[NormAct])  # may push it into conv2, never into na1
    with torch.no_grad():
        assert torch.allclose(fused(x), scaled(x), atol=1e-5)
    assert torch.equal(fused.na1.weight, scaled.na1.weight)


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class Noisy(nn.Module):
    """A training flag in the user's own module: noise in training only, dropout by flag."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.dropout(y, 0.2, self.training)
        return x + self.drop_path(y)


def test_training_flags_in_user_modules_keep_following_train_and_eval():
    torch.manual_seed(0)
    model = Noisy().train()
    gm = asr_fx.instrument(model)
    assert trace(model).meta.get("asr_fx.mode_leaves") == ["drop_path"]  # branches on self.training: kept as a call
    assert list(gm.asr.keys()) == ["bn"]  # the residual walk goes through the eval-identity drop path
    x = torch.randn(8, 4, 6, 6)
    gm.eval()
    model.eval()
    with torch.no_grad():
        v = gm.asr.bn.attention_value()
        assert torch.allclose(gm(x), x + model.bn(model.conv(x)) * v, atol=1e-6)
        gm.train()
        assert not torch.equal(gm(x), gm(x))


def test_a_forward_whose_whole_graph_depends_on_the_mode_is_refused_with_its_name():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return y * 2 if self.training else y

    with pytest.raises(TraceError, match="Branchy.*train and in eval"):
        trace(Branchy())


class ShapeChecked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = NormActNet()

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        return self.body(x)


class ValueChecked(ShapeChecked):
    """A check on tensor *values*: no example input decides it for every input."""

    def forward(self, x):
        if x.abs().sum() == 0:
            raise ValueError("empty image")
        return self.body(x)


def test_shape_check_in_forward_is_traced_with_example_inputs_and_guarded():
    model = ShapeChecked().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match=r"test_capture\.py:\d+ \(`if x.shape\[1\] != 3:`\).*example_inputs"):
        asr_fx.instrument(model)  # names the user's line, and the way out
    inst = asr_fx.instrument(model, example_inputs=(x,))
    assert isinstance(inst, ShapeChecked) and not asr_fx.get_config(inst).get("parts")  # whole forward read
    assert any(n.target is torch._assert for n in trace(model, example_inputs=(x,)).graph.nodes)  # a guard there
    _randomize(inst)
    inst.eval()
    fused = asr_fx.fuse(inst, strict=True, example_inputs=(x,))
    x1 = torch.randn(1, 3, 8, 8)  # another batch size: the batch dimension was only passed through
    with torch.no_grad():
        assert torch.allclose(fused(x1), inst(x1), atol=1e-5)
        with pytest.raises(ValueError, match="expected 3 channels"):
            inst(torch.randn(1, 4, 8, 8))  # the model's own check runs: its forward is its own


def test_value_check_in_forward_instruments_the_parts_in_place():
    model = ValueChecked().eval()
    x = torch.randn(2, 3, 8, 8)
    inst = asr_fx.instrument(model, example_inputs=(x,))
    assert isinstance(inst, ValueChecked)  # the model's own Python stays; its parts are captured
    parts = asr_fx.get_config(inst)["parts"]
    assert parts and all(isinstance(inst.get_submodule(p).asr, nn.ModuleDict) for p in parts)  # blocks inside
    assert set(model.state_dict()) <= set(inst.state_dict())
    _randomize(inst)
    inst.eval()
    fused = asr_fx.fuse(inst, strict=True, example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(fused(x), inst(x), atol=1e-5)
    reloaded = ValueChecked()
    reloaded = asr_fx.instrument(reloaded, example_inputs=(x,))
    reloaded.load_state_dict(inst.state_dict())  # stable keys: a state_dict round trip


class ListInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feats = [self.stem(im[None]).mean((2, 3)) for im in images]
        return {"logits": self.head(torch.cat(feats))}


class FilteredListInput(ListInput):
    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feats = [self.stem(im[None]).mean((2, 3)) for im in images if im.abs().sum() > 0]  # on values
        return {"logits": self.head(torch.cat(feats))}


class StackedListInput(ListInput):
    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = torch.stack([im[:, :4, :4] for im in images])  # iterates the list: its length is guarded
        return {"logits": self.head(self.stem(batch).mean((2, 3)))}


def test_list_input_of_example_length_is_traced_whole_and_the_model_takes_other_lengths():
    model = StackedListInput().eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 6, 6)]
    inst = asr_fx.instrument(model, example_inputs=(images,))
    assert isinstance(inst, StackedListInput) and list(inst.asr.keys()) == ["stem_1"]
    _randomize(inst)
    inst.eval()
    fused = asr_fx.fuse(inst, strict=True, example_inputs=(images,))
    other = [torch.randn(3, 5, 5), torch.randn(3, 7, 7)]  # other sizes, same length
    with torch.no_grad():
        assert torch.allclose(fused(other)["logits"], inst(other)["logits"], atol=1e-5)
        longer = images + images  # another length: the model's own forward runs, nothing was specialised
        assert torch.allclose(fused(longer)["logits"], inst(longer)["logits"], atol=1e-5)


def test_list_input_and_dict_output():
    model = FilteredListInput().eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 6, 6)]
    inst = asr_fx.instrument(model, example_inputs=(images,))
    assert asr_fx.get_config(inst)["parts"] == ["stem"]
    _randomize(inst)
    inst.eval()
    fused = asr_fx.fuse(inst, strict=True, example_inputs=(images,))
    with torch.no_grad():
        assert torch.allclose(fused(images)["logits"], inst(images)["logits"], atol=1e-5)


class KeywordFlags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, *, return_features: bool = False, scale=None):
        y = torch.relu(self.bn(self.conv(x)))
        if scale is not None:
            y = y * scale
        return y if return_features else y.mean((2, 3))


def test_keyword_only_flags_keep_working_with_any_value():
    model = KeywordFlags().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = asr_fx.instrument(model, example_inputs=(x,))
    assert list(gm.asr.keys()) == ["bn"]
    _randomize(gm)
    fused = asr_fx.fuse(gm.eval(), example_inputs=(x,))
    with torch.no_grad():
        assert gm(x, return_features=False).shape == (2, 8)
        features = gm(x, return_features=True, scale=2.0)  # values the trace never saw
        assert features.shape == (2, 8, 8, 8)
        assert torch.allclose(fused(x, return_features=True, scale=2.0), features, atol=1e-5)


def test_trace_errors_name_the_library_line_not_torchvision_as_torch():
    """A frame in torchvision (whose path starts with torch's directory name) is the library's line."""
    from torchvision.ops.boxes import box_area

    from asr_fx.passes.capture.trace import _user_frame

    try:
        box_area("not boxes")
    except Exception as exc:  # noqa: BLE001
        frame = _user_frame(exc)
    assert "/torchvision/ops/" in frame.filename.replace("\\", "/")


def test_equivalence_check_names_the_first_layer_that_differs():
    model = NormActNet().eval()
    broken = NormActNet().eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.conv2.weight.mul_(1.5)
    with pytest.raises(EquivalenceError, match="`conv2`"):
        check_fused(model, broken, (torch.randn(2, 3, 8, 8),))


class GlobalContext(nn.Module):
    """A GC-style block (``y + mlp(pool(y))``) and a residual block with a res-scale constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mlp = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.res_scale = nn.Parameter(torch.tensor(0.2))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y + self.mlp(y.mean((2, 3), keepdim=True))
        return y + self.res_scale * self.bn2(self.conv2(y))


def test_broadcast_add_of_a_pooled_context_is_not_a_residual_branch_and_res_scale_folds():
    model = GlobalContext().eval()
    x = torch.randn(2, 4, 8, 8)
    gm = asr_fx.instrument(model, example_inputs=(x,))
    assert [(s["node"], s["rule"]) for s in asr_fx.get_config(gm)["sites"]] == [("bn2", "residual")]
    _randomize(gm)
    fused = asr_fx.fuse(gm, strict=True, example_inputs=(x,))  # strict counts the ASR site only
    assert type(fused) is GlobalContext  # the res-scale stays the model's own parameter
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(fused(x), gm.eval()(x), atol=1e-5)


class CachedBias(nn.Module):
    """An eval-mode cache of a tensor computed from parameters (EfficientFormer's attention biases): filled by
    the first call, so a model that has run once holds a tensor in ``self.cache``."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.cache:
            self.cache = {}  # training moves the bias: the cache is stale
        return self

    def forward(self, x):
        if self.training:
            return x + self.bias * 2
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return x + self.cache[key]


class BiasCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.add_bias = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), CachedBias()

    def forward(self, x):
        return torch.relu(self.add_bias(torch.relu(self.bn(self.conv(x)))))


def test_a_tensor_cache_refilled_while_tracing_is_restored_with_its_old_tensors():
    """A trace that refills a cache dict in place (EfficientFormer: emptied by train(), refilled by an eval
    forward) left a new tensor beside the saved one; restoring compared them with ``==`` (an error)."""
    torch.manual_seed(0)
    model, x = BiasCache().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
    cache = model.add_bias.cache
    cached = cache["cpu"]
    with state_kept(model):
        cache["cpu"] = cached * 3  # the same dict object, a new tensor
    assert model.add_bias.cache is cache and list(cache) == ["cpu"] and cache["cpu"] is cached
    inst = asr_fx.instrument(model, example_inputs=(x,))
    assert asr_fx.get_config(inst)["sites"] and model.add_bias.cache["cpu"] is cached
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)

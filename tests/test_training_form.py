"""instrument's default BN-affine form: ASR blocks at BatchNorm sites computed as BN with affine ``w * v, b * v``."""

from __future__ import annotations

import copy
import operator
import pickle

import pytest
import torch
from conftest import FUSE_RTOL, n_params, perturb_asr, rel_err
from torch import nn

import asr_fx
from asr_fx.asr import ASR
from asr_fx.passes.forms.module_form import ASRBatchNorm2d
from asr_fx.errors import InvalidOptionError
from asr_fx.export import export_onnx
from asr_fx.models import cifar_resnet
from asr_fx.verify import onnx_op_counts

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models():
    """(vanilla, ordinary instrumented, BN-affine instrumented) with the same weights, all in train mode."""
    torch.manual_seed(0)
    vanilla = cifar_resnet(depth=11)
    ordinary = asr_fx.instrument(vanilla, bn_affine_form=False)
    perturb_asr(ordinary)
    fused_form = asr_fx.instrument(vanilla)  # the default
    fused_form.load_state_dict(ordinary.state_dict())
    return vanilla, ordinary, fused_form


def fresh(models):
    return tuple(copy.deepcopy(m).train() for m in models)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out - torch.linspace(-1, 1, out.numel()).reshape(out.shape)).pow(2).mean()


def blocks(model):
    return [m for name, m in model.named_modules() if name.startswith("asr.") and isinstance(m, ASR)]


def bn_forms(model):
    """The BatchNorms in the BN-affine training form (a BatchNorm subclass computing BN with w * v, b * v)."""
    return [m for m in model.modules() if isinstance(m, ASRBatchNorm2d)]


def test_every_bn_site_is_bn_affine_form_and_state_dict_keys_are_unchanged(models):
    _, ordinary, fused_form = models
    assert blocks(fused_form) and len(bn_forms(fused_form)) == len(blocks(fused_form))
    assert not bn_forms(ordinary) and all(isinstance(b, nn.BatchNorm2d) for b in bn_forms(fused_form))
    assert list(fused_form.state_dict()) == list(ordinary.state_dict())
    assert asr_fx.get_config(fused_form)["bn_affine_form"] is True
    assert asr_fx.get_config(ordinary)["bn_affine_form"] is False
    assert not any(isinstance(m, nn.BatchNorm2d) for b in blocks(fused_form) for m in b.modules())


def test_train_mode_matches_ordinary_form_outputs_gradients_and_running_stats(models):
    _, ordinary, fused_form = fresh(models)
    results = []
    for model in (ordinary, fused_form):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            out = model(X)
            loss_of(out).backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            opt.step()
        results.append((out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}))
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = results
    assert rel_err(out_a, out_b) <= 1e-5
    assert grads_a.keys() == grads_b.keys()
    assert any(".psi" in k for k in grads_a) and any("bn3.weight" in k for k in grads_a)
    for name in grads_a:
        assert rel_err(grads_a[name], grads_b[name]) <= 1e-4, name
    for key in state_a:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            assert rel_err(state_a[key], state_b[key]) <= 1e-4, key


def test_eval_mode_matches_ordinary_form(models):
    _, ordinary, fused_form = fresh(models)
    with torch.no_grad():
        assert rel_err(ordinary.eval()(X), fused_form.eval()(X)) <= 1e-6


@pytest.mark.parametrize("bn_kwargs", [{"momentum": None}, {"track_running_stats": False}, {"momentum": 0.3}])
def test_batch_norm_options_follow_nn_batchnorm(bn_kwargs):
    torch.manual_seed(0)
    vanilla = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, **bn_kwargs), nn.ReLU(), nn.Conv2d(8, 4, 1))
    ordinary = asr_fx.instrument(vanilla, sites=["1"], bn_affine_form=False)
    perturb_asr(ordinary)
    fused_form = asr_fx.instrument(vanilla, sites=["1"], bn_affine_form=True)
    fused_form.load_state_dict(ordinary.state_dict())
    assert len(bn_forms(fused_form)) == 1 and len(blocks(fused_form)) == 1
    for step in range(3):
        x = torch.randn(4, 3, 8, 8) + step
        assert rel_err(ordinary(x), fused_form(x)) <= 1e-5
    for key, value in ordinary.state_dict().items():
        assert torch.allclose(value, fused_form.state_dict()[key], rtol=1e-5, atol=1e-6), key
    with torch.no_grad():
        assert rel_err(ordinary.eval()(X[:, :, :8, :8]), fused_form.eval()(X[:, :, :8, :8])) <= 1e-5


def test_non_bn_sites_keep_the_ordinary_block():
    vanilla = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = asr_fx.instrument(vanilla, sites=["0", "1"], bn_affine_form=True)
    assert all(type(b) is ASR for b in blocks(model)) and not bn_forms(model)


def test_deepcopy_and_pickle_follow_the_copied_batch_norm(models):
    _, _, fused_form = fresh(models)
    with torch.no_grad():
        ref = fused_form.eval()(X)
    for copied in (copy.deepcopy(fused_form), pickle.loads(pickle.dumps(fused_form))):
        assert list(copied.state_dict()) == list(fused_form.state_dict())
        with torch.no_grad():
            assert torch.equal(copied.eval()(X), ref)
        bn = "layer1.0.bn3"
        before = fused_form.get_submodule(bn).running_mean.clone()
        copied.train()(X)
        assert not torch.equal(copied.get_submodule(bn).running_mean, before)  # the copy's own BN was used
        assert torch.equal(fused_form.get_submodule(bn).running_mean, before)


def test_to_float64_converts_the_whole_block(models):
    _, ordinary, fused_form = fresh(models)
    with torch.no_grad():
        out = fused_form.to(torch.float64).eval()(X.double())
        ref = ordinary.to(torch.float64).eval()(X.double())
    assert out.dtype == torch.float64 and rel_err(ref, out) <= 1e-12


@pytest.fixture(scope="module")
def fused_pair(models):
    vanilla, ordinary, fused_form = fresh(models)
    fused_form(X)  # running statistics move away from their init
    ordinary.load_state_dict(fused_form.state_dict())
    return vanilla.eval(), ordinary.eval(), fused_form.eval(), asr_fx.fuse(fused_form), asr_fx.fuse(ordinary)


def test_fuse_gives_what_it_gives_for_the_ordinary_form(fused_pair):
    vanilla, ordinary, fused_form, fused, fused_ordinary = fused_pair
    with torch.no_grad():
        ref = fused_form(X)
        assert rel_err(ref, fused(X)) <= FUSE_RTOL
        assert rel_err(fused_ordinary(X), fused(X)) <= FUSE_RTOL
    assert n_params(fused) == n_params(vanilla) == n_params(fused_ordinary)
    assert not hasattr(fused, "asr") and not any(isinstance(m, ASR) for m in fused.modules())
    assert isinstance(fused_form.get_submodule("layer1.0.bn3"), ASRBatchNorm2d)  # fuse left its input alone
    assert type(fused.get_submodule("layer1.0.bn3")) is nn.BatchNorm2d
    assert torch.equal(fused_form.get_submodule("layer1.0.bn3").weight, ordinary.get_submodule("layer1.0.bn3").weight)
    report, ordinary_report = asr_fx.fusion_report(fused), asr_fx.fusion_report(fused_ordinary)
    assert report.summary() == ordinary_report.summary() == {"bn": len(blocks(fused_form))}
    assert [(r.site, r.into) for r in report.records] == [(r.site, r.into) for r in ordinary_report.records]


def test_fuse_with_fold_bn_matches(fused_pair):
    _, _, fused_form, _, _ = fused_pair
    fused = asr_fx.fuse(fused_form, strict=True, fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert rel_err(fused_form(X), fused(X)) <= FUSE_RTOL


def test_fused_onnx_op_multiset_equals_vanilla(fused_pair, tmp_path):
    vanilla, _, _, fused, _ = fused_pair
    export_onnx(vanilla, tmp_path / "vanilla.onnx", X, verify=False)
    export_onnx(fused, tmp_path / "fused.onnx", X, verify=False)
    assert onnx_op_counts(str(tmp_path / "fused.onnx")) == onnx_op_counts(str(tmp_path / "vanilla.onnx"))


def test_save_load_round_trip_keeps_bn_affine_form(tmp_path):
    vanilla = asr_fx.build("asr_fx.models:cifar_resnet", depth=11)
    model = asr_fx.instrument(vanilla, bn_affine_form=True)
    perturb_asr(model)
    asr_fx.save(model, tmp_path / "nf.pt")
    loaded = asr_fx.load(tmp_path / "nf.pt")
    assert asr_fx.get_config(loaded)["bn_affine_form"] is True
    assert blocks(loaded) and len(bn_forms(loaded)) == len(blocks(loaded))
    with torch.no_grad():
        assert torch.equal(model.eval()(X), loaded.eval()(X))


def test_bn_affine_form_with_delta_above_one_is_refused_with_the_way_out():
    with pytest.raises(InvalidOptionError, match="delta=1"):
        asr_fx.instrument(cifar_resnet(depth=11), delta=2, bn_affine_form=True)


def test_default_is_bn_affine_form_with_one_block_per_site_and_ordinary_with_more():
    model = asr_fx.instrument(cifar_resnet(depth=11), delta=2)
    assert asr_fx.get_config(model)["bn_affine_form"] is False
    assert all(type(b) is ASR for b in blocks(model)) and len(blocks(model)) == 2 * len(model.asr)


def loss_and_grads(model, x):
    loss_of(model(x)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_a_hooked_batch_norm_is_called_so_its_hooks_fire(models):
    _, ordinary, fused_form = fresh(models)
    seen = []
    fused_form.get_submodule("layer1.0.bn3").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert rel_err(ordinary(X), fused_form(X)) <= 1e-5  # train mode: batch statistics and running stats
    assert len(seen) == 1
    reference = loss_and_grads(ordinary, X)
    for key, grad in loss_and_grads(fused_form, X).items():
        assert torch.allclose(grad, reference[key], rtol=1e-4, atol=1e-6), key


def test_a_norm_converted_to_sync_batch_norm_after_instrument_is_refused_by_fuse(models):
    _, _, fused_form = fresh(models)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(fused_form).eval()  # the blocks lose their norms
    with pytest.raises(asr_fx.ASRError, match="attached to no module.*convert_sync_batchnorm"):
        asr_fx.fuse(synced)


def test_torch_fx_tracing_records_the_ordinary_form(models):
    _, ordinary, fused_form = fresh(models)
    traced = torch.fx.symbolic_trace(fused_form.eval())  # the traced BN computes in the mode it was traced in
    called = [n.target for n in traced.graph.nodes if getattr(n.target, "__name__", "") == "batch_norm"]
    assert called  # BN is computed with its own affine, then scaled by v
    muls = [n for n in traced.graph.nodes if n.target in (torch.mul, operator.mul)]
    assert len(muls) == len(blocks(fused_form)) == len(bn_forms(fused_form))
    with torch.no_grad():
        assert rel_err(ordinary.eval()(X), traced.eval()(X)) <= 1e-6

"""Tracers and exporters run on an instrumented model (the module form) compute what it computes, and a
torch.fx graph of it holds the ASR blocks' parameters (its optimizer, state_dict and DDP see ``asr.*``)."""

from __future__ import annotations

import copy
import io
import types

import onnxruntime
import pytest
import torch
import torch.fx
from conftest import ORT_RTOL, perturb_asr, rel_err
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_conv_bn_fuse
from torchvision.models.feature_extraction import create_feature_extractor

import asr_fx
from asr_fx.models import cifar_resnet
from asr_fx.own_model import remove
from asr_fx.passes.forms.module_form import Attachment, attach, attachments, strip_module_form
from asr_fx.passes.forms.output_form import ASROutput

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[False, True], ids=["output_form", "bn_form"])
def resnet(request) -> nn.Module:
    torch.manual_seed(0)
    model = asr_fx.instrument(cifar_resnet(depth=11).eval(), bn_affine_form=request.param).eval()
    perturb_asr(model)
    return model


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_symbolic_trace_computes_the_model_and_holds_the_blocks_parameters(resnet):
    gm = torch.fx.symbolic_trace(resnet)
    with torch.no_grad():
        _same(gm(X), resnet(X))
        vanilla = copy.deepcopy(resnet)
        remove(vanilla)
        assert (resnet(X) - vanilla(X)).abs().max() > 1e-3  # the blocks act
    asr = {id(p) for p in resnet.asr.parameters()}
    assert asr and asr <= {id(p) for p in gm.parameters()}  # an optimizer over gm trains psi and theta
    assert {k for k in gm.state_dict() if k.startswith("asr.")} == {k for k in resnet.state_dict()
                                                                     if k.startswith("asr.")}
    gm(X).sum().backward()
    assert all(p.grad is not None for p in resnet.asr.parameters())
    resnet.zero_grad(set_to_none=True)


def test_graph_rewrites_and_a_retrace_keep_the_blocks(resnet):
    gm = torch.fx.symbolic_trace(resnet)
    with torch.no_grad():
        _same(torch.fx.symbolic_trace(gm)(X), resnet(X))
        _same(fx_conv_bn_fuse(gm)(X), resnet(X))  # a conv-BN fusion never drops a block


def test_torchvision_create_feature_extractor_returns_the_models_values(resnet):
    """A stage, a site's own module (its value is the scaled one, as the model's module returns) and the output."""
    nodes = {"layer1": "layer1", "layer2.0.bn3": "site", "fc": "out"}
    seen: dict[str, torch.Tensor] = {}
    handles = [resnet.get_submodule(path).register_forward_hook(
        lambda m, a, out, name=name: seen.update({name: out})) for path, name in nodes.items() if path != "fc"]
    try:
        with torch.no_grad():
            want = resnet(X)
    finally:
        for handle in handles:
            handle.remove()
    extractor = create_feature_extractor(resnet, return_nodes=nodes)
    with torch.no_grad():
        got = extractor(X)
    _same(got["out"], want)
    _same(got["layer1"], seen["layer1"])
    _same(got["site"], seen["site"])
    assert {id(p) for p in resnet.asr.parameters()} <= {id(p) for p in extractor.parameters()}


class _LeafTracer(torch.fx.Tracer):
    """A tracer that keeps every conv and norm one call (by class, as ``leaf_modules=`` options do)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def test_a_tracer_that_keeps_the_layers_leaves_still_computes_the_model(resnet):
    gm = torch.fx.GraphModule(resnet, _LeafTracer().trace(resnet))
    with torch.no_grad():
        _same(gm(X), resnet(X))


@pytest.mark.parametrize("how", ["jit.trace", "export"])
def test_jit_trace_and_torch_export_compute_the_model(resnet, how):
    with torch.no_grad():
        want = resnet(X)
        traced = torch.jit.trace(resnet, X) if how == "jit.trace" else torch.export.export(resnet, (X,)).module()
        _same(traced(X), want)


def test_onnx_export_of_the_instrumented_model_computes_it(resnet):
    buffer = io.BytesIO()
    torch.onnx.export(resnet, (X,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        want = resnet(X)
    assert rel_err(want, torch.from_numpy(got)) <= ORT_RTOL


class _AttentionBlock(nn.Module):
    """A pre-norm transformer block on ``nn.MultiheadAttention`` (its site: the attention's first output)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(x.mean(1))


def test_multihead_attention_sites_trace_with_the_blocks():
    torch.manual_seed(0)
    vanilla = _AttentionBlock().eval()
    tokens = torch.randn(2, 5, 6)
    model = asr_fx.instrument(vanilla, example_inputs=(tokens,)).eval()
    assert isinstance(model.attn, ASROutput) and isinstance(model.attn, nn.MultiheadAttention)
    perturb_asr(model, scale=2.0)
    with torch.no_grad():
        want = model(tokens)
        assert (want - vanilla(tokens)).abs().max() > 1e-3
        gm = torch.fx.symbolic_trace(model)
        _same(gm(tokens), want)
    assert {id(p) for p in model.asr.parameters()} <= {id(p) for p in gm.parameters()}


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_an_output_form_inside_torchs_transformer_layer_keeps_its_fused_fast_path_off():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        plain = layer(tokens)
        attach(layer, Attachment("linear2", "output", "k"), _Double())
        assert isinstance(layer.linear2, nn.Linear) and isinstance(layer.linear2, ASROutput)
        with_grad_off = layer(tokens)  # the fast path would skip linear2's forward (and the block)
    with_grad = layer(tokens)
    _same(with_grad_off, with_grad)
    assert (with_grad - plain).abs().max() > 1e-3
    strip_module_form(layer)
    assert type(layer.linear2) is nn.Linear
    with torch.no_grad():
        _same(layer(tokens), plain)


def test_torch_compile_of_the_output_form_matches_eager_and_does_not_recompile_after_a_step():
    torch.manual_seed(0)
    model = asr_fx.instrument(cifar_resnet(depth=11), bn_affine_form=False).train()
    perturb_asr(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    _same(compiled(X), eager(X))
    compiled(X).square().mean().backward()
    eager(X).square().mean().backward()
    for (name, got), want in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            opt.step()
            opt.zero_grad()
            compiled(X).square().mean().backward()


class _InstanceForward(nn.Module):
    """A conv whose forward is set on the instance (as some libraries do in ``__init__``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv.forward = self._conv
        self.head = nn.Conv2d(8, 4, 1)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d.forward(self.conv, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def test_a_module_with_an_instance_forward_keeps_a_hook_and_its_block_acts():
    torch.manual_seed(0)
    vanilla = _InstanceForward().eval()
    model = asr_fx.instrument(vanilla, sites=["conv"], example_inputs=(X,)).eval()
    assert [a.kind for a in attachments(model)] == ["hook"]
    perturb_asr(model)
    with torch.no_grad():
        assert (model(X) - vanilla(X)).abs().max() > 1e-3


def test_a_forward_replaced_on_an_output_form_after_instrument_is_refused():
    model = asr_fx.instrument(cifar_resnet(depth=11), bn_affine_form=False).eval()
    site = model.get_submodule("layer1.0.bn3")
    assert isinstance(site, ASROutput)
    site.forward = types.MethodType(nn.BatchNorm2d.forward, site)  # as ultralytics' m.forward = m.forward_fuse
    with pytest.raises(asr_fx.DetachedBlockError, match="forward replaced"):
        model(X)


def test_fuse_of_a_traced_instrumented_model_folds_its_blocks(resnet):
    gm = torch.fx.symbolic_trace(resnet)
    fused = asr_fx.fuse(gm, strict=True, example_inputs=(X,))
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(cifar_resnet(depth=11))
    with torch.no_grad():
        _same(fused(X), resnet(X))
        _same(gm(X), resnet(X))  # fuse left the traced model as it was


def test_fuse_of_a_graph_that_calls_a_layer_carrying_a_block_whole_is_refused(resnet):
    gm = torch.fx.GraphModule(resnet, _LeafTracer().trace(resnet))
    with pytest.raises(asr_fx.ASRError, match="as a whole.*fuse the instrumented model itself"):
        asr_fx.fuse(gm)

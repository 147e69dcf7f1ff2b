"""The instrumented model is an ordinary nn.Module in real training.

DDP (2 gloo processes on CPU), torch.compile, autocast (bfloat16 on CPU), state_dict round trip,
``.to(torch.float64)``, train()/eval(), gradient checkpointing, ``asr_parameters`` as an optimizer
group, and ``v`` computed once per forward per site (not per sample).

``torch.compile`` with the default inductor backend takes ~65 s per graph on this 2-core machine
with a cold cache (a C++ compile of every kernel; ~130 s for the test's eval and train graphs, ~11 s
once the inductor cache in /tmp is warm), so the default test uses ``backend="aot_eager"`` (the same
Dynamo capture and AOTAutograd forward/backward split, without code generation) and the inductor
test is behind ``@pytest.mark.slow``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    FUSE_RTOL,
    asr_values,
    assert_asr_trained,
    assert_own_model,
    assert_vanilla_form,
    free_port,
    fuse_and_check,
    gloo_process_group,
    perturb_asr,
    rel_err,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import asr_fx
from asr_fx.models import cifar_resnet

SHAPE = (4, 3, 32, 32)


def _small_vanilla(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet(depth=11)  # 3 bottleneck blocks, one ASR site each


def _instrumented(seed: int = 0) -> nn.Module:
    model = asr_fx.instrument(_small_vanilla(seed))
    perturb_asr(model, seed)
    return model


def _asr_blocks(model: nn.Module) -> list[asr_fx.ASR]:
    return [m for m in model.modules() if isinstance(m, asr_fx.ASR)]


def _psi_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".psi")]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - torch.linspace(-1, 1, out.numel()).reshape(out.shape)).pow(2).mean()


@pytest.fixture()
def model():
    return _instrumented()


@pytest.fixture()
def x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    with gloo_process_group(rank, world, port):
        model = _instrumented(seed=0)  # same init on every rank; DDP also broadcasts it
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + rank))  # different data per rank
        grads = {}
        for _ in range(steps):
            opt.zero_grad()
            out = ddp(x)
            _loss(out).backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.startswith("asr.")}
            opt.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.zero_grad()  # the psi gradient this rank would have without DDP's all-reduce:
        _loss(model(x)).backward()
        local = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(".psi")}
        torch.save({"grads": grads, "local": local, "params": params}, f"{out_dir}/rank{rank}.pt")


def test_ddp_two_gloo_processes_synchronise_psi_and_its_gradients(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path), 2), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world))
    psi = [n for n in r0["grads"] if n.endswith(".psi")]
    assert len(psi) == 3
    for name, g in r0["grads"].items():  # all-reduced: identical on both ranks, and not zero
        assert torch.equal(g, r1["grads"][name]), name
    assert all(r0["grads"][n].abs().sum() > 0 for n in psi)
    assert any(not torch.allclose(r0["local"][n], r1["local"][n]) for n in psi)  # the data did differ
    for key, value in r0["params"].items():  # the parameters, psi included, stay in sync
        assert torch.equal(value, r1["params"][key]), key
    start = _instrumented(seed=0).state_dict()
    assert all(not torch.equal(start[n], r0["params"][n]) for n in psi)  # psi trained


# --------------------------------------------------------------------------- torch.compile


def _check_compiled(model: nn.Module, x: torch.Tensor, backend: str, dtype: torch.dtype, rtol: float) -> None:
    """Compiled and eager agree in eval (no grad) and on every parameter's gradient in training."""
    model.to(dtype)
    x = x.to(dtype)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    model.eval(), eager.eval()
    with torch.no_grad():
        assert rel_err(eager(x), compiled(x)) <= rtol
    model.train(), eager.train()
    _loss(compiled(x)).backward()
    _loss(eager(x)).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None and rel_err(q.grad, p.grad) <= rtol, name


def test_torch_compile_aot_eager_matches_eager_forward_and_gradients(model, x):
    torch._dynamo.reset()
    _check_compiled(model, x, "aot_eager", torch.float32, 1e-4)


def test_torch_compile_trains_several_optimizer_steps_without_recompiling(model, x):
    """An optimizer step changes psi in place; the compiled model must not recompile for it (each recompile
    costs a compile, and past Dynamo's recompile limit the code runs eagerly)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    before = [p.detach().clone() for p in asr_fx.asr_parameters(model)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            opt.zero_grad()
            _loss(compiled(x)).backward()
            opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, asr_fx.asr_parameters(model)))


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager_forward_and_gradients(model, x):
    """In float64: in float32, inductor's decomposed training BatchNorm loses accuracy on this model
    state (gradients of layer3 up to 7% off eager's, which is within 2e-6 of float64). The fused model,
    the plain architecture with v in its BN affine, shows the same 7% with inductor's decompositions
    (backend "aot_eager_decomp_partition"; without the BN-training decomposition: 2e-6), so it is that
    decomposition's float32 rounding, not ASR; float64 checks that compile changes nothing else."""
    torch._dynamo.reset()
    _check_compiled(model, x, "inductor", torch.float64, 1e-9)


# --------------------------------------------------------------------------- autocast, dtype


def test_autocast_bfloat16_trains_and_stays_close_to_float32(model, x):
    model.train()
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = _loss(out.float())
    assert out.dtype == torch.bfloat16
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(".psi"):
            assert p.dtype == p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert rel_err(ref, out.float()) <= 5e-2  # bfloat16 has an 8-bit mantissa


def test_to_float64_trains_and_fuses_in_float64(model, x):
    model = model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.train()
    _loss(model(x.double())).backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    with torch.no_grad():
        ref, out = model(x.double()), fused(x.double())
    assert out.dtype == torch.float64
    assert rel_err(ref, out) <= 1e-12


# --------------------------------------------------------------------------- state_dict, modes


def test_state_dict_round_trip_through_bytes_restores_the_model(model, x):
    model.train()
    _loss(model(x)).backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = asr_fx.instrument(_small_vanilla(seed=123))  # different init, same structure
    assert restored.load_state_dict(state) is not None
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    assert set(_psi_names(restored)) == {n for n in state if n.endswith(".psi")}


def test_train_eval_reach_every_asr_block_and_eval_is_fusable(model, x):
    model.train()
    assert all(b.training for b in _asr_blocks(model))
    with torch.no_grad():
        train_out = model(x)  # batch statistics
    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        eval_out = model(x)  # running statistics
        fused_out = asr_fx.fuse(model, strict=True)(x)
    assert not torch.allclose(train_out, eval_out)
    assert rel_err(eval_out, fused_out) <= FUSE_RTOL
    assert not any(m.training for m in model.modules())  # fuse did not flip the model's mode


def test_plain_loop_on_the_cifar_resnet_keeps_its_class_through_instrument_and_fuse(x):
    vanilla = _small_vanilla()
    model = _instrumented()
    assert_own_model(model, vanilla)
    before = asr_values(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x)).backward()
        opt.step()
    assert_asr_trained(before, model)
    fused = fuse_and_check(model, x, vanilla)
    assert_vanilla_form(fused, vanilla)


# --------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(x):
    plain, ckpt = _instrumented(), _instrumented()
    plain.eval(), ckpt.eval()  # eval: the recomputation sees the same BN statistics
    _loss(plain(x)).backward()
    x_req = x.clone().requires_grad_(True)
    _loss(checkpoint(ckpt, x_req, use_reentrant=False)).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert q.grad is not None and rel_err(p.grad, q.grad) <= 1e-5, name


def test_gradient_checkpointing_of_parts_in_training_mode(x):
    """Checkpoint each stage of the instrumented model (as timm's set_grad_checkpointing does): the recomputed
    sites use the v of the forward, and every gradient is the plain model's."""

    class Checkpointed(nn.Module):
        def __init__(self, part: nn.Module) -> None:
            super().__init__()
            self.part = part

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.part, *args, use_reentrant=False)

    plain, model = _instrumented(), _instrumented()
    plain.train(), model.train()
    for stage in ("layer1", "layer2", "layer3"):
        setattr(model, stage, Checkpointed(getattr(model, stage)))
    _loss(plain(x)).backward()
    _loss(model(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        assert q.grad is not None and rel_err(p.grad, q.grad) <= 1e-5, name
    # torch's known checkpointing caveat, as for any BN model: the recomputation updates BN statistics again
    assert plain.layer1[0].bn1.num_batches_tracked == 1 and model.layer1.part[0].bn1.num_batches_tracked == 2


# --------------------------------------------------------------------------- asr_parameters


def test_asr_parameters_are_exactly_psi_and_attention_parameters(model, x):
    asr = asr_fx.asr_parameters(model)
    expected = {id(p) for n, p in model.named_parameters() if n.startswith("asr.")}
    assert len(asr) == len({id(p) for p in asr}) == len(expected)
    assert {id(p) for p in asr} == expected
    psi = {id(p) for n, p in model.named_parameters() if n.endswith(".psi")}
    attention = {id(p) for n, p in model.named_parameters() if ".attention." in n}
    assert psi | attention == expected and len(psi) == 3
    rest = [p for p in model.parameters() if id(p) not in expected]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 5e-4}, {"params": asr, "weight_decay": 0.0}], lr=0.1)
    before = [p.detach().clone() for p in asr]
    model.train()
    _loss(model(x)).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, asr))
    assert asr_fx.asr_parameters(_small_vanilla()) == []


def test_asr_parameters_with_delta_two_and_fixed_psi(x):
    model = asr_fx.instrument(_small_vanilla(), delta=2, learnable_psi=False)
    asr = asr_fx.asr_parameters(model)
    assert {id(p) for p in asr} == {id(p) for n, p in model.named_parameters() if n.startswith("asr.")}
    assert not any(n.endswith(".psi") for n, _ in model.named_parameters())  # fixed psi is a buffer
    assert len(_asr_blocks(model)) == 6


# --------------------------------------------------------------------------- v once per forward


def test_eval_without_fusing_computes_v_once_per_forward_per_site(model):
    calls: list[tuple[int, ...]] = []
    hooks = [b.attention.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
             for b in _asr_blocks(model)]
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(calls) == len(_asr_blocks(model)) == 3  # one call per site, not one per sample
    assert all(shape[0] == 1 for shape in calls)  # the attention network sees psi, not the batch


# --------------------------------------------------------------------------- attention values first


def _gradient_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
             for name, p in model.named_parameters()]
    _loss(model(x)).backward()
    for hook in hooks:
        hook.remove()
    return order


def _attention_gradients_come_last(order: list[str]) -> bool:
    first_asr = min(i for i, n in enumerate(order) if n.startswith("asr."))
    return all(n.startswith("asr.") for n in order[first_asr:])


@pytest.mark.parametrize("bn_affine_form", [True, False])
def test_attention_gradients_come_after_every_other_gradient(x, bn_affine_form):
    """v is computed before the first layer, so its backward runs last, after the activations are freed."""
    model = asr_fx.instrument(_small_vanilla(), bn_affine_form=bn_affine_form).train()
    order = _gradient_order(model, x)
    assert sorted(order) == sorted(n for n, _ in model.named_parameters())
    assert _attention_gradients_come_last(order), order


def test_hoisted_values_survive_deepcopy_and_pickle_even_after_a_forward(model, x):
    model.train()
    _loss(model(x))  # a forward holds its hoisted values (for recomputation): copies must not carry them
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(copied.eval()(x), model.eval()(x))
        model.train()
        assert _attention_gradients_come_last(_gradient_order(copied.train(), x))


def test_a_hoisted_value_is_not_reused_once_its_block_changed_or_outside_the_forward(model, x):
    model.eval()
    with torch.no_grad():
        model(x)
        stage = model.layer1
        h = model.relu(model.bn1(model.conv1(x)))
        before = stage(h)
        for block in _asr_blocks(model):
            block.psi.add_(1.0)  # an optimizer step: in place
        assert not torch.equal(stage(h), before)  # the site computes v again from the new psi


def test_a_block_called_on_its_own_computes_its_value(model):
    block = model.asr["layer1_0_bn3"]
    h = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(h), block(h, block.attention_value()))

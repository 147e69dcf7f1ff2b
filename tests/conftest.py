"""Shared test helpers. Tolerances are DESIGN.md's: torch fusion <= 1e-5 * max|ref|, onnxruntime 1e-4."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import fx, nn

import asr_fx

# Nothing in the tests reaches the network: ultralytics reads YOLO_OFFLINE once, at import (no online checks,
# no analytics), the Hugging Face hub reads HF_HUB_OFFLINE at import. Set before any test imports either.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

FUSE_RTOL = 1e-5
ORT_RTOL = 1e-4


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max|out - ref| / max|ref|."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step(model: nn.Module, x: torch.Tensor, lr: float = 0.01) -> None:
    """One SGD step on a made-up regression target, so parameters (psi included) move."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = model(x)
    loss = (out - torch.linspace(-1, 1, out.numel()).reshape(out.shape)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def fuse_and_check(model: nn.Module, x: torch.Tensor, vanilla: nn.Module | None = None) -> nn.Module:
    """Eval mode, ``asr_fx.fuse(strict=True)``, and DESIGN.md's equivalence on ``x``; with ``vanilla``
    also its exact parameter count. Returns the fused model."""
    import asr_fx

    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    if vanilla is not None:
        assert n_params(fused) == n_params(vanilla)
    return fused


def assert_same_detections(got: list[dict], want: list[dict], count: int) -> None:
    """A fused detector's per-image detections equal the instrumented one's: ``count`` each, the same
    labels, boxes within 1e-3 px and scores within 1e-5."""
    for g, w in zip(got, want, strict=True):
        assert len(w["boxes"]) == count
        assert torch.equal(g["labels"], w["labels"])
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g["scores"], w["scores"], rtol=1e-4, atol=1e-5)


def fuse_detector_checked(vanilla: nn.Module, instrumented: nn.Module, images: list[torch.Tensor], count: int,
                          acting: str, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """``instrumented`` (from ``vanilla``, a torchvision detector) with its ASR parameters moved off their start,
    fused with ``strict=True``: no ASR parameter is left, the blocks change the detections' ``acting`` field
    against ``vanilla``, and the fused detector returns the instrumented one's detections."""
    perturb_asr(instrumented, seed, scale)
    instrumented.eval()
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(images,))
    assert not any(".asr." in f".{n}" for n, _ in fused.named_parameters())
    with torch.no_grad():
        before, want, got = vanilla(images), instrumented(images), fused(images)
    assert any(not torch.equal(b[acting], w[acting]) for b, w in zip(before, want))  # the blocks act
    assert_same_detections(got, want, count)
    return fused


def fuse_checked(model: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> nn.Module:
    """``model`` (instrumented) with psi moved off its start, in eval mode, fused with ``strict=True``; the
    fused model's output on ``x`` is asserted equal to the instrumented one's (rtol = atol = ``tol``)."""
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "psi"):
                nn.init.normal_(m.psi, std=0.5)
        ref = model(x)
        fused = asr_fx.fuse(model, strict=True, example_inputs=(x,))
        torch.testing.assert_close(fused(x), ref, rtol=tol, atol=tol)
    return fused


def perturb_asr(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Move psi and attention weights away from their init so v differs per channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("asr.") or ".asr." in name:  # a part's blocks: <part>.asr.*
                p.add_(torch.randn(p.shape, generator=g) * scale)


class SharedBN(nn.Module):
    """One BatchNorm called at two places: an ASR site after its second call cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv2(self.bn(self.conv1(x))))


# --------------------------------------------------------------------------- distributed workers (gloo, CPU)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a worker group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_process_group(rank: int, world: int, port: int):
    """The body of a ``torch.multiprocessing.spawn`` worker: one thread, a gloo group, always destroyed.

    When the body succeeds the worker ends with ``os._exit(0)`` right after ``destroy_process_group``:
    gloo's C++ threads may still hold finished work objects whose teardown during interpreter
    finalisation aborts the process ("terminate called without an active exception", SIGABRT), which
    spawn reports as a failed worker although every result was written. When the body raises, the
    exception propagates and spawn reports it as usual.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- trainers (tests/integrations)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection (a download of weights, fonts, assets) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def is_asr_key(key: str) -> bool:
    """A state_dict key of an ASR block: ``asr.*`` (at the root or in a captured part's ``<part>.asr.*``)."""
    return key.startswith("asr.") or ".asr." in key


def assert_own_model(instrumented: nn.Module, vanilla: nn.Module) -> None:
    """``instrumented`` is the user's model with ASR in it: the vanilla model's own class (not a GraphModule),
    its state_dict keys are the vanilla keys plus ``asr.*``, and the ASR blocks have parameters."""
    assert type(instrumented) is type(vanilla), type(instrumented)
    assert isinstance(instrumented, type(vanilla)) and not isinstance(instrumented, fx.GraphModule)
    keys, plain = set(instrumented.state_dict()), set(vanilla.state_dict())
    assert plain <= keys, sorted(plain - keys)[:5]
    assert keys - plain and all(is_asr_key(k) for k in keys - plain), sorted(keys - plain)[:5]
    assert asr_fx.asr_parameters(instrumented)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_vanilla_form(fused: nn.Module, vanilla: nn.Module) -> None:
    """``fused`` is the vanilla architecture with the folded weights: the vanilla class, exactly the vanilla
    state_dict keys and parameter count, the vanilla module classes, and no hooks the vanilla model has not."""
    assert type(fused) is type(vanilla), type(fused)
    assert set(fused.state_dict()) == set(vanilla.state_dict())
    assert n_params(fused) == n_params(vanilla)
    assert [type(m) for m in fused.modules()] == [type(m) for m in vanilla.modules()]
    assert _hook_count(fused) == _hook_count(vanilla)


def asr_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ASR parameter, by name (to see that training moved them)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_asr_key(n)}


def assert_asr_trained(before: dict[str, torch.Tensor], model: nn.Module, share: float = 1.0) -> None:
    """At least ``share`` of the psi in ``before`` changed in ``model``: the trainer's optimizer reached the ASR
    blocks (below 1 where a site's gradient is exactly 0 on the test's random data, e.g. behind a dead ReLU)."""
    after = dict(model.named_parameters())
    psi = [n for n in before if n.endswith("psi")]
    moved = [n for n in psi if not torch.equal(before[n], after[n].detach().cpu())]
    assert psi and len(moved) >= share * len(psi), sorted(set(psi) - set(moved))


def without_asr(model: nn.Module, vanilla: nn.Module) -> nn.Module:
    """A copy of ``vanilla`` holding ``model``'s weights without its ASR blocks (what the blocks are compared
    with, to see that they act)."""
    plain = copy.deepcopy(vanilla)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not is_asr_key(k)})
    return plain


def calibrate_bn(model: nn.Module, x: torch.Tensor, passes: int = 2) -> None:
    """Running BatchNorm statistics from ``x`` (a cumulative average over ``passes`` train-mode forwards), so a
    random-init network's eval output depends on its input (ultralytics' init otherwise leaves YOLO's eval
    output nearly constant, and no comparison of outputs could tell models apart). Restores the mode."""
    training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(training)


def write_yolo_dataset(root: Path, images: int = 4, size: int = 32, names: tuple[str, ...] = ("a", "b")) -> Path:
    """A YOLO-format detection dataset of random images with two boxes each under ``root``; returns its data.yaml
    (train and val are the same images)."""
    from PIL import Image  # optional dependency: ultralytics brings it

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub / "train").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"{i}.png")
        (root / "labels" / "train" / f"{i}.txt").write_text(f"0 0.5 0.5 0.4 0.4\n{1 % len(names)} 0.3 0.3 0.2 0.2\n")
    listed = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames:\n{listed}")
    return data

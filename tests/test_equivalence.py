"""The self-check ``fuse`` runs: relative to the model's own rounding noise, never an absolute floor; on
every fuse, with a derived probe where no example input is given; dtypes and inf positions compared."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import perturb_asr
from torch import nn

import asr_fx
import asr_fx.api
from asr_fx.equivalence import UncheckedWarning, check_fused
from asr_fx.errors import EquivalenceError
from asr_fx.noise_floor import perturbed_outputs, tensor_error
from asr_fx.passes.layers.norm import NormRule


class _Tiny(nn.Module):
    """Outputs about 1e-8 at init (as a depth head with tiny weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(1e-8)
            self.conv.bias.mul_(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _off_by(model: nn.Module, factor: float) -> nn.Module:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.conv.weight[0].mul_(factor)
    return broken


def test_a_one_percent_error_on_outputs_of_1e_8_is_caught() -> None:
    model = _Tiny().eval()
    x = (torch.randn(2, 3, 8, 8),)
    assert model(*x).abs().max() < 1e-6
    with pytest.raises(EquivalenceError, match="rounding noise"):
        check_fused(model, _off_by(model, 1.01), x)


def test_a_one_ulp_move_of_every_weight_passes_even_where_outputs_cancel() -> None:
    class Cancel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) - self.b(x)  # exactly 0 in the model, rounding noise after any change

    model = Cancel().eval()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.a.weight.mul_(1 + torch.finfo(torch.float32).eps)
    check_fused(model, moved, (torch.randn(4, 8),))


def test_noise_is_measured_without_changing_the_model() -> None:
    model = _Tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = perturbed_outputs(model, lambda m: m(torch.ones(1, 3, 4, 4)))
    assert len(outs) == 2 and not torch.equal(outs[0], model(torch.ones(1, 3, 4, 4)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dtype_and_inf_positions_are_compared() -> None:
    ref = torch.tensor([1.0, float("inf"), -float("inf"), 2.0])
    assert tensor_error(ref, ref.clone())[0] == 0
    assert tensor_error(ref, ref.double())[0] == float("inf")
    assert tensor_error(ref, torch.tensor([1.0, float("inf"), float("inf"), 2.0]))[0] == float("inf")
    assert tensor_error(ref, torch.tensor([1.0, float("inf"), -float("inf"), 2.1]))[0] > 1
    assert tensor_error(ref, torch.tensor([1.0, float("inf"), -float("inf"), 2.00001]))[0] <= 1


def test_a_fused_model_with_another_output_dtype_is_refused() -> None:
    class Cast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float()

    model = nn.Sequential(nn.Linear(4, 4)).double().eval()
    with pytest.raises(EquivalenceError, match="dtype"):
        check_fused(model, nn.Sequential(copy.deepcopy(model[0]), Cast()), (torch.randn(2, 4, dtype=torch.float64),))


def test_fuse_without_example_inputs_checks_on_a_derived_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    real = asr_fx.api.fuse_pipeline

    def corrupting(*args, **kwargs):  # a fold that went wrong by 1%
        gm, records = real(*args, **kwargs)
        with torch.no_grad():
            gm.get_submodule("conv").weight[0].mul_(1.01)
        return gm, records

    monkeypatch.setattr(asr_fx.api, "fuse_pipeline", corrupting)
    with pytest.raises(EquivalenceError):
        asr_fx.fuse(_Tiny())


def test_fuse_says_so_when_it_cannot_check() -> None:
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    with pytest.warns(UncheckedWarning, match="example_inputs"):
        asr_fx.fuse(Embed())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedWarning)
        asr_fx.fuse(Embed(), example_inputs=(torch.tensor([[1, 2]]),))


class _Detector(nn.Module):
    """Returns torchvision-style detections sorted by score; two scores tie within rounding."""

    def __init__(self, swap: bool) -> None:
        super().__init__()
        self.swap = swap
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        boxes = self.head(x)
        scores = torch.tensor([0.9, 0.5 + 6e-8, 0.5, 0.1])
        labels = torch.tensor([1, 2, 2, 3])
        order = torch.tensor([0, 2, 1, 3]) if self.swap else torch.arange(4)
        return [{"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}]


def test_detections_that_swap_near_ties_are_the_same_detections() -> None:
    model, swapped = _Detector(False).eval(), _Detector(True).eval()
    swapped.load_state_dict(model.state_dict())
    x = (torch.randn(4, 4),)
    check_fused(model, swapped, x)
    with torch.no_grad():
        swapped.head.bias[0] += 0.5  # a real difference still shows
    with pytest.raises(EquivalenceError):
        check_fused(model, swapped, x)


def test_detectors_that_find_nothing_compare_equal_and_differ_from_one_that_finds_something() -> None:
    class Empty(_Detector):
        def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            return [{k: v[:0] for k, v in d.items()} for d in super().forward(x)]

    x = (torch.randn(4, 4),)
    with pytest.warns(UncheckedWarning, match="empty"):  # nothing to compare: said, never passed silently
        check_fused(Empty(False).eval(), Empty(True).eval(), x)
    with pytest.raises(EquivalenceError):
        check_fused(Empty(False).eval(), _Detector(False).eval(), x)


def test_a_model_whose_outputs_are_rounding_noise_is_not_blamed_on_capture() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.a(x) - self.b(x)) * 1e6 + self.a(x)  # rounding noise amplified a millionfold

    model = Noisy().eval()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.a.weight.mul_(1 + 8 * torch.finfo(torch.float32).eps)
    try:
        check_fused(model, moved, (torch.randn(4, 8),))
    except EquivalenceError as exc:
        assert "please report" not in str(exc)


class _Filtering(nn.Module):
    """A detector-like model: a traced backbone part, then a data-dependent filter that keeps nothing
    on random weights (its whole forward does not trace: it is captured part by part)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
        self.block = _Residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.block(self.backbone(x))
        if bool((scores > 1e9).any()):  # data-dependent: the root does not trace
            return scores
        return scores[scores > 1e9]  # empty


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.fc(x))


def test_a_model_with_empty_outputs_is_checked_part_by_part(monkeypatch) -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    instrumented = asr_fx.instrument(_Filtering().eval(), example_inputs=x)
    assert asr_fx.get_config(instrumented)["parts"]
    perturb_asr(instrumented)
    instrumented.eval()
    monkeypatch.setattr(NormRule, "scale_output", lambda self, module, v: None)  # a fold that loses its scale
    with pytest.raises(EquivalenceError):
        asr_fx.fuse(instrumented, example_inputs=x)  # the whole model's empty output compares nothing: parts do

"""Checks for users' own CI: ``assert_fusion_equivalent(model, example_inputs)``, and the comparison with
the vanilla model that ``asr-fx fuse --strict`` / ``asr-fx verify --strict`` run (:func:`compare_with_vanilla`,
:func:`assert_same_as_vanilla`).

The check the project runs on its built-in models, usable in any pytest suite::

    from asr_fx.testing import assert_fusion_equivalent

    def test_my_model_fuses():
        model = asr_fx.instrument(MyNet(), attention="se")
        model.load_state_dict(torch.load("ckpt.pt", weights_only=True))
        assert_fusion_equivalent(model, torch.randn(2, 3, 224, 224), onnx=True)

On failure it raises ``AssertionError`` with a message that says which check failed and by how
much, so pytest shows it as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asr_fx._util import count_parameters, non_finite_kind
from asr_fx.api import asr_parameters, fuse, fusion_report
from asr_fx.atomic import temp_folder
from asr_fx.errors import ASRError, FusionError, VerificationError
from asr_fx.export import export_onnx
from asr_fx.passes.capture.shapes import as_input_tuple
from asr_fx.passes.graph.modes import preserved_training_modes
from asr_fx.verify import flatten_outputs, fp32_matmul_precision, onnx_op_counts, op_count_diff

#: DESIGN.md's tolerances: fused vs instrumented in torch, and onnxruntime vs torch
FUSE_RTOL = 1e-5
ONNX_RTOL = 1e-4


def _output_problems(reference: list[torch.Tensor], actual: list[torch.Tensor], rtol: float, atol: float) -> list[str]:
    if len(reference) != len(actual):
        return [f"the fused model returns {len(actual)} output tensor(s), the original {len(reference)}"]
    problems = []
    for i, (ref, out) in enumerate(zip(reference, actual)):
        if ref.shape != out.shape:
            problems.append(f"output{i}: shape {tuple(out.shape)} != original {tuple(ref.shape)}")
            continue
        if ref.numel() == 0:
            continue
        ref, out = ref.detach().double(), out.detach().double()
        if non_finite_kind(out):
            problems.append(f"output{i}: the fused model gives NaN/Inf")
            continue
        diff = (out - ref).abs()
        scale = ref.abs().max().item()
        bound = atol + rtol * scale
        worst = diff.max().item()
        if worst > bound:
            index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            problems.append(f"output{i}: max|fused - original| = {worst:.3g} > {bound:.3g} "
                            f"(atol {atol:g} + rtol {rtol:g} * max|original| {scale:.3g}; rel "
                            f"{worst / max(scale, 1e-30):.3g}) "
                            f"at index {index}: fused {out[index].item():.6g}, original {ref[index].item():.6g}")
    return problems


def assert_fusion_equivalent(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    rtol: float = FUSE_RTOL,
    atol: float = 0.0,
    strict: bool = True,
    fold_bn: bool = False,
    vanilla: nn.Module | None = None,
    check_parameters: bool = True,
    onnx: bool = False,
    onnx_rtol: float = ONNX_RTOL,
    opset: int | None = None,
    leaf_modules: Any = None,
) -> nn.Module:
    """Fuse ``model`` and assert the result is equivalent to it; returns the fused module.

    Checks, each failing with an ``AssertionError`` that says what and by how much:

    - ``asr_fx.fuse(model, strict=strict)`` succeeds (with ``strict``, every ASR site folds) and
      leaves ``model``'s state_dict unchanged;
    - in eval mode, every output of the fused model is within ``atol + rtol * max|original|`` of
      ``model``'s on ``example_inputs`` (default ``rtol=1e-5``);
    - with ``check_parameters`` (and not ``fold_bn``): the fused parameter count equals ``vanilla``'s
      when given, else ``model``'s less its ASR parameters (psi and attention networks);
    - with ``onnx=True``: the fused model exports to ONNX, and onnxruntime agrees with ``model``
      within ``onnx_rtol`` (default 1e-4); with ``vanilla`` given, its op multiset equals the
      vanilla model's.

    ``model``'s train/eval mode is restored afterwards. The checks run with TF32 off (CUDA's
    TF32 matmuls err by ~1e-4, more than ``rtol``); the flags are restored afterwards.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this function's
    inputs = as_input_tuple(example_inputs)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with preserved_training_modes(model), fp32_matmul_precision():
        model.eval()
        try:
            fused = fuse(model, strict=strict, fold_bn=fold_bn, example_inputs=inputs, leaf_modules=leaf_modules)
        except FusionError as exc:
            raise AssertionError(f"fuse(model, strict=True) left ASR sites unfolded:\n{exc}") from None
        except ASRError as exc:
            raise AssertionError(f"fuse(model) failed: {exc}") from None
        changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
        if changed:
            raise AssertionError(f"fuse(model) changed the model it was given: {changed[:5]}")
        with torch.no_grad():
            reference, actual = flatten_outputs(model(*inputs)), flatten_outputs(fused(*inputs))
        problems = _output_problems(reference, actual, rtol, atol)
        if problems:
            report = fusion_report(fused)
            where = f"\nfusion report:\n{report.table()}" if report is not None and report.records else ""
            raise AssertionError("the fused model is not equivalent to the original:\n  "
                                 + "\n  ".join(problems) + where)
        if check_parameters and not fold_bn:
            _check_parameters(model, fused, vanilla)
        if onnx:
            _check_onnx(model, fused, inputs, onnx_rtol, opset, vanilla)
        return fused


def _check_parameters(model: nn.Module, fused: nn.Module, vanilla: nn.Module | None) -> None:
    __tracebackhide__ = True
    if vanilla is not None:
        expected, what = count_parameters(vanilla), "the vanilla model's"
    else:
        expected, what = count_parameters(model) - sum(p.numel() for p in asr_parameters(model)), \
            "the original's less its ASR parameters"
    if count_parameters(fused) != expected:
        raise AssertionError(f"the fused model has {count_parameters(fused):,} parameters, {what} count is "
                             f"{expected:,}: "
                             "something stayed that should have folded")


def _check_onnx(model: nn.Module, fused: nn.Module, inputs: tuple, rtol: float, opset: int | None,
                vanilla: nn.Module | None) -> None:
    __tracebackhide__ = True
    with temp_folder(name="testing") as workdir:
        expected_ops = None
        if vanilla is not None:  # export_onnx restores the vanilla model's train/eval modes
            expected_ops = export_onnx(vanilla, os.path.join(workdir, "vanilla.onnx"), inputs,
                                       verify=False, opset=opset).op_counts
        try:
            report = export_onnx(fused, os.path.join(workdir, "fused.onnx"), inputs, reference=model, rtol=rtol,
                                 opset=opset)
        except VerificationError as exc:
            raise AssertionError(f"onnxruntime disagrees with the original model:\n{exc}") from None
        except ASRError as exc:
            raise AssertionError(f"the fused model does not export to ONNX: {exc}") from None
        if expected_ops is not None and report.op_counts != expected_ops:
            raise AssertionError("the fused ONNX graph's op multiset differs from the vanilla model's: "
                                 + op_count_diff(expected_ops, report.op_counts))


@dataclass
class VanillaComparison:
    """A fused model beside the vanilla model it should equal in size and structure (None: not measured).

    ``reference`` is the vanilla model compared with (with ``fold_bn``: a copy with BatchNorm folded into
    the conv before it, as the fused model has it); ``vanilla_note`` says why its op counts are unknown
    (its export failed)."""

    reference: nn.Module
    fold_bn: bool = False
    params: int | None = None
    vanilla_params: int | None = None
    op_counts: dict[str, int] | None = None
    vanilla_op_counts: dict[str, int] | None = None
    vanilla_note: str = ""

    @property
    def same_params(self) -> bool | None:
        """Whether the parameter counts are equal (None: the fused model's was not counted)."""
        return None if self.params is None or self.vanilla_params is None else self.params == self.vanilla_params

    @property
    def same_op_counts(self) -> bool | None:
        """Whether the ONNX op multisets are equal (None: one of them is not known)."""
        if self.op_counts is None or self.vanilla_op_counts is None:
            return None
        return self.op_counts == self.vanilla_op_counts

    @property
    def vanilla_name(self) -> str:
        return "the vanilla model (BN folded)" if self.fold_bn else "the vanilla model"

    def problems(self) -> list[str]:
        """What differs, one sentence each; empty when everything measured is the same."""
        problems = []
        if self.same_params is False:
            problems.append(f"the fused model has {self.params:,} parameters, {self.vanilla_name} "
                            f"{self.vanilla_params:,}")
        if self.same_op_counts is False:
            assert self.op_counts is not None and self.vanilla_op_counts is not None
            problems.append(f"the ONNX op multiset differs from {self.vanilla_name}'s: "
                            f"{op_count_diff(self.vanilla_op_counts, self.op_counts)}")
        return problems


def vanilla_reference(vanilla: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                      fold_bn: bool = False, leaf_modules: Any = None) -> nn.Module:
    """What a fused model is compared with: ``vanilla`` itself, or with ``fold_bn`` a fused copy of it (eval
    mode) with BatchNorm folded into the conv before it, as ``fuse(..., fold_bn=True)`` leaves the fused model."""
    if not fold_bn:
        return vanilla
    return fuse(vanilla, fold_bn=True, example_inputs=as_input_tuple(example_inputs), leaf_modules=leaf_modules)


def compare_with_vanilla(
    vanilla: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    fused: nn.Module | None = None,
    onnx_file: str | os.PathLike | None = None,
    onnx: bool = False,
    fold_bn: bool = False,
    opset: int | None = None,
    leaf_modules: Any = None,
    vanilla_op_counts: dict[str, int] | None = None,
) -> VanillaComparison:
    """Compare a fused model with its vanilla model: what ``--strict`` checks besides the folding itself.

    - with ``fused`` (the fused module): its parameter count against ``vanilla``'s;
    - with ``onnx_file`` (the fused model's ONNX file), or ``onnx=True`` (``fused`` is exported into a
      temporary folder): its ONNX op multiset against ``vanilla``'s (``vanilla`` is exported for it, without
      verification, unless ``vanilla_op_counts`` are given; an export failure is ``vanilla_note``).

    ``fold_bn``: compare with the vanilla model with BatchNorm folded too (:func:`vanilla_reference`).
    Nothing is raised for a difference: :meth:`VanillaComparison.problems` lists them
    (:func:`assert_same_as_vanilla` asserts there are none).
    """
    inputs = as_input_tuple(example_inputs)
    reference = vanilla_reference(vanilla, inputs, fold_bn=fold_bn, leaf_modules=leaf_modules)
    result = VanillaComparison(reference, fold_bn=fold_bn, vanilla_params=count_parameters(reference))
    if fused is not None:
        result.params = count_parameters(fused)
    if onnx_file is None and not (onnx and fused is not None):
        return result
    with temp_folder(name="testing") as workdir:
        if vanilla_op_counts is None:
            try:
                vanilla_op_counts = export_onnx(reference, os.path.join(workdir, "vanilla.onnx"), inputs,
                                                verify=False, opset=opset).op_counts
            except ASRError as exc:
                result.vanilla_note = f"export failed: {str(exc).splitlines()[0][:80]}"
        result.vanilla_op_counts = vanilla_op_counts
        if onnx_file is not None:
            result.op_counts = onnx_op_counts(onnx_file)
        elif fused is not None:
            result.op_counts = export_onnx(fused, os.path.join(workdir, "fused.onnx"), inputs, verify=False,
                                           opset=opset).op_counts
    return result


def assert_same_as_vanilla(
    vanilla: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    fused: nn.Module | None = None,
    onnx_file: str | os.PathLike | None = None,
    onnx: bool = False,
    fold_bn: bool = False,
    opset: int | None = None,
    leaf_modules: Any = None,
) -> VanillaComparison:
    """:func:`compare_with_vanilla` as an assertion: ``AssertionError`` naming every difference, or when an op
    comparison was asked for and the vanilla model's ops are unknown. Returns the comparison."""
    __tracebackhide__ = True
    result = compare_with_vanilla(vanilla, example_inputs, fused=fused, onnx_file=onnx_file, onnx=onnx,
                                  fold_bn=fold_bn, opset=opset, leaf_modules=leaf_modules)
    problems = result.problems()
    if (onnx_file is not None or onnx) and result.vanilla_op_counts is None:
        problems.append(f"{result.vanilla_name}'s ONNX ops are unknown ({result.vanilla_note})")
    if problems:
        raise AssertionError("the fused model is not the vanilla model's size and structure:\n  "
                             + "\n  ".join(problems))
    return result

"""The checks a fuzz program must pass through :func:`asr_fx.fuse` (see :mod:`fuzz_programs`)."""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import asr_fx

from .fuzz_model import Program, build, example_input, instrument_for
from .model_kept import snapshot, what_changed

CATEGORIES = ("equivalence", "unreported leftover", "crash", "input mutated", "dtype")


@dataclass
class Failure:
    category: str
    message: str


def _tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _is_constant(node: Any, memo: dict) -> bool:
    """Whether a node's value depends on no placeholder (a get_attr or a computation on them)."""
    if not isinstance(node, fx.Node):
        return True
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = True
        elif node.op in ("placeholder", "output"):
            memo[node] = False
        else:
            memo[node] = all(_is_constant(n, memo) for n in node.all_input_nodes)
    return memo[node]


_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, torch.multiply)
_MUL_METHODS = ("mul", "mul_", "multiply", "multiply_")


def _traced(model: nn.Module) -> fx.GraphModule | None:
    """``model`` traced by ``torch.fx`` (None where its forward does not trace)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 -- an untraceable forward: nothing to read
        return None


def _module_form_leftovers(fused: nn.Module, spec: dict) -> list[Failure]:
    """Leftovers in what fuse returned for a model in the module form (the user's own class, not the
    fused graph): an ASR block or hook still in it, or a constant mul in its forward that the program
    itself does not compute (the program's own muls are the user's code, kept as written)."""
    failures = []
    blocks = [name for name, m in fused.named_modules() if isinstance(m, asr_fx.ASR) or name.split(".")[0] == "asr"]
    if blocks:
        failures.append(Failure("unreported leftover", f"fuse returned {type(fused).__name__} with ASR blocks "
                                                       f"still in it: {blocks[:5]}"))
    hooked = sorted(name for name, m in fused.named_modules()
                    for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                    if (getattr(h, "__module__", None) or type(h).__module__).startswith("asr_fx"))
    if hooked:
        failures.append(Failure("unreported leftover", f"fuse returned {type(fused).__name__} with asr_fx's "
                                                       f"forward hooks still on {hooked[:5]}"))
    graph, original = _traced(fused), _traced(Program(spec))
    if graph is not None and original is not None:
        own_muls = {n.format_node() for n in constant_muls(original)}
        for node in constant_muls(graph):
            if node.format_node() not in own_muls:
                failures.append(Failure("unreported leftover", f"`{node.format_node()}` is in the forward of the "
                                                               f"{type(fused).__name__} fuse returned, and not in "
                                                               "the program's own"))
    return failures


def constant_muls(gm: fx.GraphModule) -> list[fx.Node]:
    """Every multiply (any spelling) in ``gm`` of a graph value by a constant: a get_attr, a value
    computed from get_attrs only, or a Python number."""
    memo: dict = {}
    found = []
    for node in gm.graph.nodes:
        is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or \
                 (node.op == "call_method" and node.target in _MUL_METHODS)
        if not is_mul:
            continue
        operands = [*node.args, *node.kwargs.values()]
        if len(operands) != 2:
            continue
        a, b = operands
        for x, c in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and not _is_constant(x, memo) and \
                    (isinstance(c, (int, float)) or (isinstance(c, fx.Node) and _is_constant(c, memo))):
                found.append(node)
                break
    return found


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs, then the input as the model left it (an in-place op may write into it)."""
    x = x.clone()
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(x))] + [x]


def check_program(spec: dict, rtol: float = 1e-5) -> tuple[list[Failure], str]:
    """Run one program through ``fuse``; returns ``(failures, outcome)`` where ``outcome`` is
    ``"fused"``, ``"refused: <error>"`` (an ``asr_fx.ASRError``: a legitimate refusal) or
    ``"skipped: <why>"``."""
    failures: list[Failure] = []
    x = example_input(spec)
    if spec.get("instrument") and any(op["op"] in ("hook", "function") for op in spec["ops"]):
        program = Program(spec)  # instrument leaves it exactly as it was, also when it refuses
        kept = snapshot(program)
        try:
            instrument_for(spec)(program, example_inputs=(x,))
        except asr_fx.ASRError:
            pass
        changed = what_changed(kept, program)
        if changed:
            failures.append(Failure("input mutated", f"instrument: {changed}"))
    try:
        model = build(spec)
    except asr_fx.EquivalenceError as exc:  # instrument's self-check (outputs and gradients): a capture bug
        return failures + [Failure("equivalence", f"instrument's self-check: {str(exc).splitlines()[0][:300]}")], \
            "refused"
    except asr_fx.ASRError:
        spec = {**spec, "instrument": False}
        model = build(spec)
    if spec.get("instrument"):  # instrument's result must run before fuse is asked anything
        try:
            _run(copy.deepcopy(model).eval(), x)
        except Exception as exc:  # noqa: BLE001
            return [Failure("crash", f"instrument returned a model that raises {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]}")], "crash"
    x_before = x.clone()
    before = snapshot(model)
    mode = model.training
    kwargs: dict[str, Any] = {"example_inputs": (x,)} if spec.get("example_inputs") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = asr_fx.fuse(model, **kwargs)
    except asr_fx.ASRError as exc:
        return failures, f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    except Exception as exc:  # noqa: BLE001 -- any other exception is the finding
        return [Failure("crash", f"fuse raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")], "crash"
    if not torch.equal(x, x_before):
        failures.append(Failure("input mutated", "fuse changed the example input tensor it was given"))
    changed = what_changed(before, model)
    if changed or model.training != mode:
        failures.append(Failure("input mutated", changed or "fuse changed model.training"))

    # reference: the original model, eval mode, fp32 and a float64 copy
    model.eval()
    try:
        ref32 = _run(model, x)
        ref64 = _run(copy.deepcopy(model).double(), x.double())
    finally:
        model.train(mode)
    try:
        out = _run(fused, x)
    except Exception as exc:  # noqa: BLE001
        return failures + [Failure("crash", f"fused model raised {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:200]}")], "crash"
    if len(out) != len(ref32):
        failures.append(Failure("equivalence", f"{len(out)} outputs instead of {len(ref32)}"))
        return failures, "fused"
    for i, (o, r32, r64) in enumerate(zip(out, ref32, ref64)):
        what = f"output {i}" if i < len(out) - 1 else "the input tensor after the call"
        if o.dtype != r32.dtype:
            failures.append(Failure("dtype", f"{what} is {o.dtype}, the original's is {r32.dtype}"))
        if o.shape != r32.shape:
            failures.append(Failure("equivalence", f"{what} has shape {tuple(o.shape)}, not {tuple(r32.shape)}"))
            continue
        scale = r64.abs().max().item() if r64.numel() else 0.0
        own = (r32.double() - r64).abs().max().item() if r64.numel() else 0.0  # fp32 error of the original
        err = (o.double() - r64).abs().max().item() if r64.numel() else 0.0
        if not math.isfinite(err) and not math.isfinite(own):
            continue
        if not (err <= rtol * scale + 4 * own + 1e-30):
            failures.append(Failure("equivalence", f"{what}: max|fused-ref64| = {err:.3g}, max|ref64| = "
                                                   f"{scale:.3g}, original's own fp32 error {own:.3g}"))
    if not isinstance(fused, fx.GraphModule):  # the user's own class: fuse's graph is not returned
        return failures + _module_form_leftovers(fused, spec), "fused"
    report = asr_fx.fusion_report(fused)
    reported = {r.mul for r in report.records if not r.folded} if report else set()
    folded = {r.mul for r in report.records if r.folded} if report else set()
    for node in constant_muls(fused):
        if node.name not in reported:
            failures.append(Failure("unreported leftover", f"`{node.format_node()}` is left in the fused graph "
                                                           "and not in fusion_report as left as Mul"))
    names = {n.name for n in fused.graph.nodes}
    for name in sorted(folded & names):
        failures.append(Failure("unreported leftover", f"fusion_report says `{name}` folded, but it is still in "
                                                       "the graph"))
    return failures, "fused"


def reproducer(spec: dict) -> str:
    """Python that reruns one program."""
    return f"from testkit.fuzz_check import check_program; print(check_program({spec!r}))"


__all__ = ["CATEGORIES", "Failure", "check_program", "constant_muls", "reproducer"]

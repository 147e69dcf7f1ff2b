"""Random programs through ``asr_fx.fuse``: equivalence in eval mode against a float64
reference, the input model and tensors unchanged, every constant multiply left in the graph reported,
output dtypes kept. Programs and checks: ``tools/testkit/fuzz_programs.py``; the 10,000-program run is
``tools/fuzz_fuse.py`` and the ``slow`` test below.

Status: ``fuzz_programs.KNOWN_BUGS`` is empty: the features it once left out (the fold bugs of
test_fold_regressions.py and the fuzzer's findings F1-F3) are fixed and generated again. A new open bug
gets an entry there (and a gate in the generator) until its fix lands.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings

import asr_fx
from testkit.fuzz_model import Program, example_input
from testkit.fuzz_programs import KNOWN_BUGS, check_program, programs, random_spec, reproducer


def _assert_passes(spec: dict) -> None:
    failures, outcome = check_program(spec)
    assert not failures, "\n".join([f"{f.category}: {f.message}" for f in failures] +
                                   [f"outcome: {outcome}", "reproducer:", reproducer(spec)])


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          print_blob=True)
@given(programs())
def test_fuse_random_programs_hypothesis(spec):
    note(reproducer(spec))
    _assert_passes(spec)


@pytest.mark.parametrize("start", [0, 100, 200])
def test_fuse_random_programs_seeded(start):
    """100 seeded programs per case (the same programs as ``tools/fuzz_fuse.py --seed START``)."""
    for seed in range(start, start + 100):
        _assert_passes(random_spec(seed))


@pytest.mark.slow
def test_fuse_10000_random_programs():
    failing = []
    for seed in range(10_000):
        failures, _ = check_program(random_spec(seed))
        if failures:
            failing.append((seed, failures[0].category, failures[0].message))
    assert not failing, f"{len(failing)} failing seeds (random_spec(seed)): {failing[:20]}"


# ---- the checker itself can fail -----------------------------------------------------------------

_SPEC = {"seed": 7, "dim": 2, "in_channels": 3, "batch": 2, "train_mode": True, "instrument": False,
         "example_inputs": True, "head": False,
         "ops": [{"op": "conv", "out": 4, "k": 3, "groups": 1, "transpose": False, "bias": True},
                 {"op": "scale", "spelling": "*", "values": [0.5, 1.0, 1.5, 2.0], "per_channel": True,
                  "storage": "parameter", "dtype": "float32", "layout": "channels_first"},
                 {"op": "act", "kind": "relu"}]}


def test_checker_passes_a_correct_fuse():
    failures, outcome = check_program(_SPEC)
    assert (failures, outcome) == ([], "fused")


def _categories(spec: dict) -> set[str]:
    return {f.category for f in check_program(spec)[0]}


def test_checker_sees_a_wrong_model(monkeypatch):
    real = asr_fx.fuse

    def off_by_a_bit(model, **kw):
        fused = real(model, **kw)
        with torch.no_grad():
            fused.get_submodule("layers.0").bias.add_(1e-3)
        return fused

    monkeypatch.setattr(asr_fx, "fuse", off_by_a_bit)
    assert _categories(_SPEC) == {"equivalence"}


def test_checker_sees_an_unreported_mul(monkeypatch):
    monkeypatch.setattr(asr_fx, "fuse",
                        lambda model, **kw: torch.fx.symbolic_trace(copy.deepcopy(model).eval()))
    monkeypatch.setattr(asr_fx, "fusion_report", lambda fused: None)
    assert _categories(_SPEC) == {"unreported leftover"}


def test_checker_sees_a_mutated_input_model(monkeypatch):
    real = asr_fx.fuse

    def mutating(model, **kw):
        with torch.no_grad():
            model.get_submodule("layers.0").weight.mul_(1.0 + 1e-7)
        return real(model, **kw)

    monkeypatch.setattr(asr_fx, "fuse", mutating)
    assert "input mutated" in _categories(_SPEC)


def test_checker_sees_a_changed_dtype(monkeypatch):
    real = asr_fx.fuse

    def float64_output(model, **kw):
        fused = real(model, **kw)
        out = next(n for n in fused.graph.nodes if n.op == "output")
        with fused.graph.inserting_before(out):
            out.args = (fused.graph.call_method("double", (out.args[0],)),)
        fused.recompile()
        return fused

    monkeypatch.setattr(asr_fx, "fuse", float64_output)
    assert "dtype" in _categories(_SPEC)


def test_checker_reports_a_crash(monkeypatch):
    def crash(model, **kw):
        raise IndexError("boom")

    monkeypatch.setattr(asr_fx, "fuse", crash)
    failures, outcome = check_program(_SPEC)
    assert outcome == "crash" and [f.category for f in failures] == ["crash"]


def test_checker_accepts_asr_errors_as_refusals(monkeypatch):
    def refuse(model, **kw):
        raise asr_fx.ASRError("no")

    monkeypatch.setattr(asr_fx, "fuse", refuse)
    assert check_program(_SPEC) == ([], "refused: ASRError: no")


#: the feature gates the generator knows (the keys the fixed fold bugs had; KNOWN_BUGS entries use them)
GATES = ("extreme_scale", "float64_scale", "imul_read_again", "inplace_after_scale", "inplace_on_input",
         "instrument_float64_param", "reshape_round_trip", "unmatched_spellings")


@pytest.mark.parametrize("key", sorted(set(KNOWN_BUGS) | set(GATES)))
def test_each_known_bug_entry_leaves_something_out(key):
    """Every gate (and KNOWN_BUGS entry) changes some generated program (with the other features
    generated): leaving it out of ``exclude`` brings the feature back."""
    assert any(random_spec(seed, exclude={key}) != random_spec(seed, exclude=set()) for seed in range(500))


# ---- the capture families: autograd Functions, hooks installed by forward, spelled activations -----------

_CAPTURE_SPEC = {**_SPEC, "instrument": True, "ops": [
    *_SPEC["ops"][:1], {"op": "norm", "kind": "bn", "affine": True}, {"op": "spelled_act", "kind": "swish"},
    {"op": "hook"}, {"op": "function", "kind": "reverse"},
    {"op": "conv", "out": 4, "k": 1, "groups": 1, "transpose": False, "bias": True}]}


# the checks about the captured graph itself: instrument's graph form (a GraphModule of the capture)
_CAPTURE_GRAPH_SPEC = {**_CAPTURE_SPEC, "graph_form": True}


def test_the_generator_makes_the_capture_families():
    ops = {op["op"] for seed in range(200) for op in random_spec(seed)["ops"]}
    assert {"function", "spelled_act", "hook"} <= ops


def test_checker_passes_the_capture_families():
    instrumented = asr_fx.instrument(Program(_CAPTURE_SPEC), example_inputs=(example_input(_CAPTURE_SPEC),))
    assert list(instrumented.asr) == ["layers_1"]  # the bn before the spelled swish
    assert check_program(_CAPTURE_SPEC) == ([], "fused")
    assert check_program(_CAPTURE_GRAPH_SPEC) == ([], "fused")


def test_checker_sees_a_lost_backward(monkeypatch):
    import contextlib
    import sys

    monkeypatch.setattr(sys.modules["asr_fx.passes.capture.trace"], "functions_kept_opaque", contextlib.nullcontext)
    assert _categories(_CAPTURE_GRAPH_SPEC) == {"equivalence"}


def test_checker_sees_hooks_added_by_capture(monkeypatch):
    import sys

    values = sys.modules["asr_fx.passes.capture.concrete_values"]
    monkeypatch.setattr(values, "_CONTAINERS", ())  # hook dicts (and caches) no longer restored
    assert "input mutated" in _categories(_CAPTURE_GRAPH_SPEC)

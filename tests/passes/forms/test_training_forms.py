"""The training forms as declared pairs: instrument ends with every form's apply, fuse starts with every
undo in reverse; undoing a form keeps the function and takes the form out, applying it again puts it back."""

import copy

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx.passes.forms.asr_blocks import BatchNormAffineASR
from asr_fx.passes.forms.hoist_attention_values import unhoist_attention_values
from asr_fx.passes.infra import PassContext, pass_name
from asr_fx.passes.pipelines import FUSE_PIPELINE, INSTRUMENT_PIPELINE, TRAINING_FORMS, InstrumentOptions

OPTIONS = InstrumentOptions("Sequential", blocks=None, bn_affine_form=True)  # type: ignore[arg-type]


def test_instrument_ends_with_the_applies_and_fuse_starts_with_the_undos_in_reverse():
    applies = [pass_name(f.apply) for f in TRAINING_FORMS]
    undos = [pass_name(f.undo) for f in reversed(TRAINING_FORMS)]
    assert INSTRUMENT_PIPELINE.pass_names()[-len(applies):] == applies
    assert FUSE_PIPELINE.pass_names()[:len(undos)] == undos


def _plain():
    """An instrumented model with no training form (blocks are ``x * v`` computing their own ``v``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    gm = asr_fx.instrument(model, rule="norm-act", example_inputs=(torch.randn(2, 3, 8, 8),), bn_affine_form=False)
    unhoist_attention_values(gm)
    gm.recompile()
    torch.manual_seed(1)
    for p in gm.parameters():  # away from v = 1, so that a wrong rewrite shows
        p.data.add_(0.1 * torch.randn_like(p))
    return gm.eval()


def _with_forms(count):
    """The plain model with the first ``count`` training forms applied, in instrument's order."""
    gm = _plain()
    for form in TRAINING_FORMS[:count]:
        gm = form.apply(gm, PassContext(OPTIONS)).module
        gm.recompile()
    return gm


def _has_form(name, gm):
    if name == "bn_affine":
        return any(isinstance(m, BatchNormAffineASR) for m in gm.modules())
    return unhoist_attention_values(copy.deepcopy(gm)) > 0  # counts the hoisted values


def _same_function(before, after):
    x = torch.randn(2, 3, 8, 8)
    after.recompile()
    with torch.no_grad():
        return torch.allclose(after(x), before(x), atol=1e-5)


@pytest.mark.parametrize("index", range(len(TRAINING_FORMS)), ids=[f.name for f in TRAINING_FORMS])
def test_apply_keeps_the_function_and_puts_the_form_in(index):
    form, gm = TRAINING_FORMS[index], _with_forms(index)
    assert not _has_form(form.name, gm)
    before = copy.deepcopy(gm)
    applied = form.apply(gm, PassContext(OPTIONS)).module
    assert _same_function(before, applied) and _has_form(form.name, applied)


@pytest.mark.parametrize("index", range(len(TRAINING_FORMS)), ids=[f.name for f in TRAINING_FORMS])
def test_undo_keeps_the_function_and_takes_the_form_out(index):
    """Fuse undoes the forms in reverse, so each undo sees the forms before it applied, not those after."""
    form, gm = TRAINING_FORMS[index], _with_forms(index + 1)
    assert _has_form(form.name, gm)
    before = copy.deepcopy(gm)
    undone = form.undo(gm, PassContext(OPTIONS)).module
    assert _same_function(before, undone) and not _has_form(form.name, undone)

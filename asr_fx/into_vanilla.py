"""Write a fused model's weights into the user's own vanilla model: ``fuse(model, into=vanilla)``.

torch.fx keeps module paths, so the fused GraphModule's state_dict keys are the vanilla model's: the folded
weights (BN gamma/beta, conv kernels and biases, linear rows) go back under the same keys, buffers with them,
and the vanilla class's own ``forward`` computes what the fused graph computes. Every value is checked: key
sets and shapes must agree, and the filled model must compute the fused model's outputs on a probe input
(max abs error <= ``rtol * max|reference|`` per output) before anything is written.

Refuses (:class:`asr_fx.errors.VanillaModelError`, nothing written) where a fold produced something the
vanilla class has no place for, naming the site and the reason:

- a scale left as a constant ``Mul``, or folded into a functional call as a new constant (a ``_folded_*`` tensor);
- a layer that gained a tensor (an ``affine=False`` norm that now has an affine, a conv that gained a bias
  when BatchNorm was folded into it with ``fold_bn=True``);
- a vanilla tensor the fused model no longer has (a BatchNorm folded away by ``fold_bn=True``);
- a vanilla model of another architecture (key sets or shapes differ: the first mismatches named).

A constant parameter scale of the model itself (a layer scale such as ConvNeXt's ``gamma``) that :func:`fuse`
folded into its layer is written as ones: the vanilla forward multiplies by 1, the layer holds the scale.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from asr_fx import atomic, equivalence
from asr_fx.config import asr_config
from asr_fx.errors import OutputPathError, VanillaModelError
from asr_fx.fusion import FusionReport, fusion_report
from asr_fx.own_model import tree_copy
from asr_fx.partial_capture import is_partial, part_paths, part_probe
from asr_fx.passes import trace
from asr_fx.passes.fold.constant_fold import FOLDED_PREFIX, holds_folded
from asr_fx.passes.forms.module_form import has_module_form
from asr_fx.state_dicts import with_version_metadata

#: relative tolerance of the check: max abs error <= RTOL * max |fused output|, per output
RTOL = 1e-5
_SHOWN = 5


def _owner_and_name(key: str) -> tuple[str, str]:
    owner, _, name = key.rpartition(".")
    return owner, name


def _records_into(report: FusionReport | None, module_path: str) -> list[str]:
    if report is None:
        return []
    return [r.site or r.mul for r in report.records if module_path in _labels(r)]


def _labels(record: Any) -> list[str]:
    """The layers (module paths or node names) a fold record's scale went into."""
    return [label for label in str(getattr(record, "into", "") or "").split(", ") if label]


def _folded_constant_problem(fused: fx.GraphModule, key: str, report: FusionReport | None) -> str | None:
    """Why a ``_folded_*`` tensor of ``fused`` has no place in the vanilla model, naming its site."""
    users = [u for n in fused.graph.nodes if n.op == "get_attr" and n.target == key for u in n.users]
    by_mul = {r.mul: r for r in report.records} if report is not None else {}
    own = [by_mul.get(u.name) for u in users]
    if users and report is not None and all(r is not None and not r.folded and not any(
            r.site == b or r.site.startswith(b + ".") for b in report.blocks) for r in own):
        return None  # the model's own scale (a layer scale, logit_scale.exp()) left as it was: vanilla computes it
    for user in users:
        record = by_mul.get(user.name)
        if record is not None and not record.folded:
            return (f"site `{record.site or record.mul}` (after `{record.target}`) stays a constant Mul "
                    f"({record.reason or 'not folded'}): the vanilla forward has no such multiply")
    callers = ", ".join(f"`{u.name}` ({getattr(u.target, '__name__', u.target)})" for u in users) or "nothing"
    sites = [r.site or r.mul for r in (report.records if report else []) if any(u.name in _labels(r) for u in users)]
    where = f"site(s) {sites}" if sites else f"the call(s) {callers}"
    return (f"{where} folded into the new constant `{key}` (a functional call whose weight is not a parameter "
            "of the model, or a norm without affine): the vanilla class has no tensor for it")


def _extra_key_problem(fused: fx.GraphModule, vanilla: nn.Module, key: str, value: torch.Tensor,
                       report: FusionReport | None) -> str | None:
    """Why the fused tensor ``key``, absent from the vanilla state_dict, cannot be dropped; ``None`` when the
    vanilla model holds the same value outside its state_dict (a non-persistent buffer), or when no fold went
    into its owner: a constant the trace or constant folding made (torch.fx's ``_tensor_constantN``, anchors
    computed from shapes), which the vanilla forward computes itself; the output check then holds the vanilla
    model to computing the same without it."""
    if key.split(".")[-1].startswith(FOLDED_PREFIX):
        return _folded_constant_problem(fused, key, report)
    owner, name = _owner_and_name(key)
    module, sites = vanilla.get_submodule(owner), _records_into(report, owner)
    held = getattr(module, name, None)
    if name in module._parameters or (sites and not isinstance(held, torch.Tensor)):
        return (f"`{owner}` ({type(module).__name__}) gained a `{name}` in fusion"
                f"{' from site(s) ' + str(sites) if sites else ''}, which the vanilla class does not have "
                "(an affine=False norm given an affine, a bias=False conv given a bias by fold_bn=True)")
    if not sites or (isinstance(held, torch.Tensor) and held.shape == value.shape
                     and torch.equal(held.detach().cpu(), value.detach().cpu())):
        return None  # a derived constant, or a non-persistent buffer that fusion left as it was
    return f"`{key}` is not saved by the vanilla model (a non-persistent buffer) but fusion changed it"


def _used_as_scale(graph: fx.Graph, key: str) -> bool | None:
    """``True`` when ``key`` is read only as a ``mul`` operand (directly or through views: a layer scale
    ``gamma.unsqueeze(-1)``), ``False`` when not read at all, ``None`` when read otherwise."""
    users = [u for n in graph.nodes if n.op == "get_attr" and n.target == key for u in n.users]
    if not users:
        return False
    muls = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
    views = {"unsqueeze", "reshape", "view", "expand", "expand_as", "squeeze", "flatten", "to", "type_as"}
    while users:
        name = getattr(users[0].target, "__name__", users[0].target)
        if name in views and users[0].op in ("call_method", "call_function"):
            users = [*users[1:], *users[0].users]
        elif name in muls:
            users = users[1:]
        else:
            return None
    return True


def _missing_key_values(vanilla: nn.Module, source: nn.Module, missing: list[str], leaf_modules: Any,
                        example_inputs: tuple[Any, ...] | None,
                        fused_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Values for vanilla keys the fused model does not have: ones for a parameter scale that fusion folded
    into its layer (its value where the fused model still multiplies by it: ``holds_folded``); for a tensor the
    eval forward never reads (an unused parameter) the source model's value, else the vanilla model's own;
    problems for the rest. The vanilla model is traced shape-aware on ``example_inputs``."""
    source_state, own = source.state_dict(), vanilla.state_dict()
    try:
        graph = trace(tree_copy(vanilla).eval(), leaf_modules, bind_training=False,
                      example_inputs=example_inputs).graph
    except Exception as exc:  # noqa: BLE001 - named in the refusal
        return {}, [f"vanilla keys {missing[:_SHOWN]} are not in the fused model, and the vanilla model does not "
                    f"trace to tell why ({type(exc).__name__})"]
    values, problems = {}, []
    for key in missing:
        use, src = _used_as_scale(graph, key), source_state.get(key)
        if use is True and src is not None and src.shape == own[key].shape:
            values[key] = src if holds_folded(fused_state, src) else torch.ones_like(src)
        elif use is False:
            values[key] = src if src is not None and src.shape == own[key].shape else own[key]
        elif src is not None and src.shape == own[key].shape and not isinstance(
                vanilla.get_submodule(_owner_and_name(key)[0]), _BatchNorm):
            values[key] = src  # a tensor the model computes a constant from (logit_scale.exp()): its own value;
            # where fusion folded that constant into a layer, the output check refuses
        else:
            owner = _owner_and_name(key)[0]
            if isinstance(vanilla.get_submodule(owner), _BatchNorm):
                problems.append(f"`{key}` is not in the fused model: the BatchNorm `{owner}` was folded into the conv "
                                "before it (fold_bn=True); leave fold_bn off with into=")
            else:
                problems.append(f"`{key}` is read by the vanilla forward but the fused model has no such tensor "
                                "(another architecture?)")
    return values, problems


def vanilla_state_dict(fused: nn.Module, vanilla: nn.Module, source: nn.Module, *,
                       leaf_modules: Any = None,
                       example_inputs: tuple[Any, ...] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict, with the vanilla model's keys, that makes ``vanilla`` compute ``fused``.

    ``source`` is the model :func:`asr_fx.fuse` was given (for tensors the fused graph no longer
    reads). Raises :class:`VanillaModelError` naming the site and reason where a fold has no place
    in the vanilla class, or the first key/shape mismatches for another architecture.
    """
    if not isinstance(fused, fx.GraphModule):  # fused into its own class already: the vanilla keys, checked
        return _same_architecture(fused.state_dict(), vanilla)
    report = fusion_report(fused)
    fused_state, target = fused.state_dict(), vanilla.state_dict()
    modules = {name for name, _ in vanilla.named_modules()}
    foreign = [k for k in fused_state if k not in target and _owner_and_name(k)[0] not in modules
               and not _owner_and_name(k)[1].startswith(FOLDED_PREFIX)]
    if foreign:
        only_vanilla = [k for k in target if k not in fused_state]
        raise VanillaModelError(f"{type(vanilla).__name__} is another architecture than the fused model: keys only in "
                                f"the fused model {foreign[:_SHOWN]}{_more(foreign)}, only in the vanilla model "
                                f"{only_vanilla[:_SHOWN]}{_more(only_vanilla)}; build the vanilla model with the same "
                                "factory and arguments")
    problems = [p for k in fused_state if k not in target
                if (p := _extra_key_problem(fused, vanilla, k, fused_state[k], report)) is not None]
    if problems:
        raise VanillaModelError(f"cannot write the fused model into {type(vanilla).__name__}: "
                                + "; ".join(problems[:_SHOWN]) + _more(problems)
                                + ". Use the fused GraphModule itself, or leave those sites out of instrument "
                                  "(exclude=[...])")
    shapes = [f"`{k}` {tuple(fused_state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in fused_state and fused_state[k].shape != v.shape]
    if shapes:
        raise VanillaModelError(f"{type(vanilla).__name__} is another architecture than the fused model: shapes "
                                f"differ (fused vs vanilla) at {', '.join(shapes[:_SHOWN])}{_more(shapes)}; build "
                                "the vanilla model with the same factory and arguments")
    missing = [k for k in target if k not in fused_state]
    extra_values, problems = (_missing_key_values(vanilla, source, missing, leaf_modules, example_inputs, fused_state)
                              if missing else ({}, []))
    if problems:
        raise VanillaModelError(f"cannot write the fused model into {type(vanilla).__name__}: "
                                + "; ".join(problems[:_SHOWN]) + _more(problems))
    return {k: (fused_state[k] if k in fused_state else extra_values[k]).detach() for k in target}


def _same_architecture(state: dict[str, torch.Tensor], vanilla: nn.Module) -> dict[str, torch.Tensor]:
    target = vanilla.state_dict()  # the keys and shapes of ``state`` must be these, else VanillaModelError
    diffs = ([k for k in state if k not in target], [k for k in target if k not in state], [f"`{k}` {tuple(v.shape)} "
             f"vs {tuple(target[k].shape)}" for k, v in state.items() if k in target and v.shape != target[k].shape])
    if any(diffs):
        what = ("keys only in the fused model", "only in the vanilla model", "shapes (fused vs vanilla)")
        listed = ", ".join(f"{w} {d[:_SHOWN]}{_more(d)}" for w, d in zip(what, diffs))
        raise VanillaModelError(f"{type(vanilla).__name__} is another architecture than the fused model: {listed}; "
                                "build the vanilla model with the same factory and arguments")
    return {k: v.detach() for k, v in state.items()}


def _more(items: Sequence[Any]) -> str:
    return f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""


def probe_inputs(fused: nn.Module, source: nn.Module,
                 example_inputs: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """The input the check runs: ``example_inputs``, else the input shape ``instrument`` recorded on
    ``source`` (:func:`asr_fx.equivalence.probe_inputs`), else, for a fused GraphModule, one derived from
    the layer that reads its single input (a conv's channels at 32 pixels a side, a linear's features);
    raises :class:`VanillaModelError` asking for ``example_inputs`` otherwise."""
    known = equivalence.probe_inputs(source, example_inputs)
    if known is not None:
        return known
    ref = equivalence.input_like(fused)
    kwargs: dict[str, Any] = {"dtype": ref.dtype, "device": ref.device} if ref is not None and ref.is_floating_point() \
        else {}
    generator = torch.Generator().manual_seed(0)
    placeholders = [n for n in fused.graph.nodes if n.op == "placeholder"] if isinstance(fused, fx.GraphModule) else []
    first = next(iter(placeholders[0].users), None) if len(placeholders) == 1 else None
    module = fused.get_submodule(str(first.target)) if first is not None and first.op == "call_module" else None
    if isinstance(module, nn.modules.conv._ConvNd):
        size = (1, module.in_channels) + (32,) * (module.weight.dim() - 2)
        return (torch.randn(*size, generator=generator).to(**kwargs),)
    if isinstance(module, nn.Linear):
        return (torch.randn(1, module.in_features, generator=generator).to(**kwargs),)
    raise VanillaModelError("fuse(..., into=) checks the filled model on a probe input, and none is known: pass "
                            "example_inputs=(torch.randn(1, 3, 224, 224),) (the shape the model takes) to fuse")


def flat_outputs(value: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested output (tuples, lists, dicts, Hugging Face ``ModelOutput``) with its path."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, Mapping):
        return [item for k, v in value.items() for item in flat_outputs(v, f"{path}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in flat_outputs(v, f"{path}[{i}]")]
    return []


def check_same_outputs(reference: nn.Module, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                       rtol: float = RTOL) -> None:
    """Raise :class:`VanillaModelError` naming the worst output unless ``model(*inputs)`` matches
    ``reference(*inputs)`` in eval mode: same outputs, integer outputs (labels) equal, float outputs
    with max abs error <= ``rtol * max|reference|`` each. Both run as the equivalence checks run them
    (:func:`asr_fx.equivalence.run_on_copies`: copied inputs, one seed, state restored)."""
    with equivalence.saved_state(reference, model):
        want = flat_outputs(equivalence.run_on_copies(reference, inputs, False))
        got = flat_outputs(equivalence.run_on_copies(model, inputs, False))
    if [(p, tuple(t.shape)) for p, t in want] != [(p, tuple(t.shape)) for p, t in got]:
        raise VanillaModelError(f"{type(model).__name__} returns other outputs than the fused model: "
                                f"{[(p, tuple(t.shape)) for p, t in got][:_SHOWN]} vs "
                                f"{[(p, tuple(t.shape)) for p, t in want][:_SHOWN]}")
    worst = None
    for (path, ref), (_, out) in zip(want, got):
        if not ref.is_floating_point():
            ok = torch.equal(ref, out)
            ratio = 0.0 if ok else float("inf")
        else:
            err = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
            scale = ref.double().abs().max().item() if ref.numel() else 0.0
            ratio = err / (rtol * scale) if scale > 0 else (0.0 if err == 0 else float("inf"))
        if worst is None or ratio > worst[0]:
            worst = (ratio, path, ref, out)
    if worst is not None and worst[0] > 1:
        _, path, ref, out = worst
        err = (out.double() - ref.double()).abs().max().item()
        raise VanillaModelError(f"{type(model).__name__} with the fused weights does not compute what the fused model "
                                f"computes: worst output {path} has max abs error {err:.3g}, over {rtol:g} x max|ref| "
                                f"= {rtol * ref.double().abs().max().item():.3g}; its forward differs from the traced "
                                "one (a fold it has no place for?). Use the fused GraphModule instead")


def parts_state_dict(fused: nn.Module, vanilla: nn.Module, source: nn.Module, *,
                     leaf_modules: Any = None) -> dict[str, torch.Tensor]:
    """:func:`vanilla_state_dict` for a model instrumented part by part (:mod:`asr_fx.partial_capture`):
    each fused part's weights for the matching submodule of ``vanilla`` (refusals name the part), and
    every other tensor of ``source`` (outside the parts) under its own key, key sets and shapes checked."""
    parts = part_paths(source)
    state: dict[str, torch.Tensor] = {}
    for path in parts:
        try:
            target = vanilla.get_submodule(path)
        except AttributeError:
            raise VanillaModelError(f"{type(vanilla).__name__} has no submodule `{path}`, where the instrumented "
                                    "model has an instrumented part: another architecture; build the vanilla "
                                    "model with the same factory and arguments") from None
        config = asr_config(source)
        part_source = source.get_submodule(path)
        ref = next(iter(part_source.parameters()), None)
        probe = part_probe(config, path, ref) if config is not None and ref is not None else None
        try:  # traced on the part's recorded input shapes, as instrument captured it
            part = model_state_dict(fused.get_submodule(path), target, part_source,
                                    leaf_modules=leaf_modules, example_inputs=probe)
        except VanillaModelError as exc:
            raise VanillaModelError(f"part `{path}`: {exc}") from None
        state.update({f"{path}.{k}": v for k, v in part.items()})

    def outside(key: str) -> bool:
        return not any(key.startswith(f"{path}.") for path in parts)

    rest = {k: v.detach() for k, v in source.state_dict().items() if outside(k)}
    others = {k: v for k, v in vanilla.state_dict().items() if outside(k)}
    only_source, only_vanilla = [k for k in rest if k not in others], [k for k in others if k not in rest]
    shapes = [f"`{k}` {tuple(v.shape)} vs {tuple(others[k].shape)}" for k, v in rest.items()
              if k in others and v.shape != others[k].shape]
    if only_source or only_vanilla or shapes:
        raise VanillaModelError(f"{type(vanilla).__name__} is another architecture than the instrumented model "
                                f"outside its instrumented parts {list(parts)}: keys only in the instrumented model "
                                f"{only_source[:_SHOWN]}{_more(only_source)}, only in the vanilla model "
                                f"{only_vanilla[:_SHOWN]}{_more(only_vanilla)}, shapes (instrumented vs vanilla) "
                                f"{shapes[:_SHOWN]}{_more(shapes)}; build the vanilla model with the same factory "
                                "and arguments")
    state.update(rest)
    return state


def model_state_dict(fused: nn.Module, vanilla: nn.Module, source: nn.Module, *, leaf_modules: Any = None,
                     example_inputs: tuple[Any, ...] | None = None) -> dict[str, torch.Tensor]:
    """:func:`parts_state_dict` for a model instrumented part by part (a part may be so itself: a part
    whose own forward does not trace whole), else :func:`vanilla_state_dict` (``example_inputs``: the
    whole model's input, for tracing the vanilla model shape-aware)."""
    if is_partial(source):
        return parts_state_dict(fused, vanilla, source, leaf_modules=leaf_modules)
    if not isinstance(fused, fx.GraphModule) and (asr_config(fused) is not None or has_module_form(fused)):
        raise VanillaModelError(f"the fused model is a {type(fused).__name__} that still holds ASR blocks, not what "
                                "asr_fx.fuse returns: pass fuse's result")
    return vanilla_state_dict(fused, vanilla, source, leaf_modules=leaf_modules, example_inputs=example_inputs)


def fuse_into(fused: nn.Module, vanilla: nn.Module, source: nn.Module, *,
              example_inputs: Sequence[torch.Tensor] | None = None, leaf_modules: Any = None,
              keep_on_refusal: bool = True) -> nn.Module:
    """Load ``fused``'s weights into ``vanilla`` (strict), check it computes what ``fused`` computes on a probe
    input, and return ``vanilla`` itself in eval mode; on any refusal ``vanilla`` is left as it was
    (``keep_on_refusal=False``: no backup held, not restored). See the module docstring for what refuses.

    ``source`` is the model :func:`asr_fx.fuse` was given. When it was instrumented part by part,
    ``fused`` is :func:`asr_fx.partial_capture.fuse_parts`'s result: each part goes into the matching
    submodule of ``vanilla`` and the rest of ``source``'s tensors with it (:func:`parts_state_dict`)."""
    if not isinstance(vanilla, nn.Module):
        raise VanillaModelError(f"into= takes the vanilla nn.Module to fill, got {type(vanilla).__name__}")
    if any(m is vanilla for m in source.modules()) or any(m is vanilla for m in fused.modules()):
        raise VanillaModelError("into= must be a freshly built vanilla model, not the model given to fuse or a "
                                "part of it: build one with the same factory, e.g. into=torchvision.models.resnet50()")
    known = equivalence.probe_inputs(source, example_inputs)
    state = model_state_dict(fused, vanilla, source, leaf_modules=leaf_modules, example_inputs=known)
    inputs = known if known is not None else probe_inputs(fused, source, None)
    own = vanilla.state_dict() if keep_on_refusal else {}
    backup = with_version_metadata({k: v.detach().clone() for k, v in own.items()}, vanilla)
    state = with_version_metadata(state, vanilla)
    modes = {m: m.training for m in vanilla.modules()}
    try:
        vanilla.load_state_dict(state, strict=True)
        vanilla.eval()
        check_same_outputs(fused, vanilla, inputs)
    except BaseException:
        if keep_on_refusal:
            vanilla.load_state_dict(backup, strict=True)
        for m, mode in modes.items():
            m.training = mode
        raise
    return vanilla


def save_vanilla_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` for ``vanilla.load_state_dict(torch.load(path, weights_only=True))``,
    atomically (:func:`asr_fx.atomic.atomic_output`: a private temporary folder beside ``path``, then a rename);
    a failure leaves nothing at ``path`` (and a file already there untouched). Raises :class:`VanillaModelError`
    naming ``path`` when it cannot be written (a missing or read-only folder, a folder at ``path``).

    ``model`` is what ``fuse(..., into=vanilla)`` returned (a fused GraphModule's state_dict fits the vanilla
    class only where ``into=`` would accept it, so pass the ``into=`` result).
    """
    try:
        path = atomic.check_writable(path)
    except OutputPathError as exc:
        raise VanillaModelError(f"cannot save the state_dict: {exc}") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic.atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path

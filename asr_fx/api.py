"""instrument / find_sites / fuse: the two phases of ASR, like prepare_fx / convert_fx."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from asr_fx.asr import ASR, PsiInit, make_site_block, resolve_preset
from asr_fx.equivalence import check_fused, check_instrumented
from asr_fx.errors import ASRError, InvalidOptionError, NoSitesError, TraceError
from asr_fx.partial_capture import fuse_parts, instrument_parts, is_partial
from asr_fx.norm_fused import into_norm_fused, out_of_norm_fused
from asr_fx.values_first import insert_values_first, remove_values_first
from asr_fx.passes import Site, fuse_pipeline, insert_asr, trace
from asr_fx.passes.attention_patterns import find_channel_attention
from asr_fx.passes.convert_existing import convert_existing_attention, existing_attention_sites, pooled_means
from asr_fx.passes.locate import find_residual_sites, site_at
from asr_fx.passes.rules import (
    LOOKS_FOR,
    find_auto_sites,
    find_branch_sites,
    find_norm_act_sites,
    find_transformer_sites,
)
from asr_fx.report import FusionReport

CONFIG_KEY = "asr_fx"

#: placement rules by name: each maps a traced graph to its sites
RULES: dict[str, Callable[[fx.GraphModule], list[Site]]] = {
    "auto": find_auto_sites,
    "residual": find_residual_sites,
    "norm-act": find_norm_act_sites,
    "branch": find_branch_sites,
    "transformer": find_transformer_sites,
}
RULE_ALIASES = {"norm_act": "norm-act", "resnet": "residual", "vit": "transformer", "shufflenet": "branch"}

SiteSelector = Sequence[str] | Callable[[Site], bool] | None


ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def as_input_tuple(example_inputs: ExampleInputs | None) -> tuple[torch.Tensor, ...] | None:
    """``example_inputs`` as a tuple of positional inputs: a bare tensor is one input."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> None:
    """Record every node's output shape (``node.meta['tensor_meta']``) without touching BN statistics."""
    inputs = as_input_tuple(example_inputs)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ASRError(f"example_inputs of shape(s) {shapes} do not fit the model: {first}. "
                       "Pass inputs the model's forward accepts, e.g. (torch.randn(1, 3, 224, 224),)") from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def _candidate_sites(gm: fx.GraphModule) -> list[Site]:
    """Every node a scale could follow: calls of conv/norm/linear modules, multi-head attention outputs."""
    return [s for s in (site_at(gm, node, "explicit") for node in gm.graph.nodes) if s is not None]


def _matches(site: Site, selector: Sequence[str] | Callable[[Site], bool]) -> bool:
    if callable(selector):
        return bool(selector(site))
    return site.node in selector or site.module in selector or site.key in selector


def _select_sites(gm: fx.GraphModule, rule: str, sites: SiteSelector, exclude: SiteSelector) -> list[Site]:
    if sites is not None:
        candidates = _candidate_sites(gm)
        chosen = [s for s in candidates if _matches(s, sites)]
        if not callable(sites):
            known = {n for s in candidates for n in (s.node, s.module, s.key)}
            missing = [name for name in sites if name not in known]
            if missing:
                raise ASRError(
                    f"sites={missing} name no conv/norm/linear call in the traced graph; "
                    f"candidates include {[s.module or s.node for s in candidates[:8]]}"
                )
    else:
        name = RULE_ALIASES.get(rule, rule)
        if name not in RULES:
            raise InvalidOptionError(f"unknown rule {rule!r}; choose one of {sorted(set(RULES) | set(RULE_ALIASES))}")
        chosen = RULES[name](gm)
    if exclude is not None:
        chosen = [s for s in chosen if not _matches(s, exclude)]
    return chosen


def find_sites(
    model: nn.Module,
    rule: str = "auto",
    *,
    sites: SiteSelector = None,
    exclude: SiteSelector = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf_modules: Any = None,
    existing: bool = True,
) -> list[Site]:
    """The ASR sites ``instrument`` would use, as a list of :class:`Site` (nothing is changed).

    With ``existing=True`` (default) the model's own channel attention blocks follow, with
    ``rule="existing"`` and ``node`` = their multiply: ``instrument(..., convert_existing=True)``
    turns those into ASR form.
    """
    gm = trace(copy.deepcopy(model), leaf_modules)
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    chosen = _select_sites(gm, rule, sites, exclude)
    return chosen + (existing_attention_sites(gm) if existing else [])


def _attention_name(attention: Any) -> Any:
    if isinstance(attention, str):
        return attention
    module, qualname = getattr(attention, "__module__", None), getattr(attention, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname and "<" not in qualname else None


def instrument(
    model: nn.Module,
    attention: str | Callable[..., nn.Module] = "se",
    rule: str = "auto",
    *,
    sites: SiteSelector = None,
    exclude: SiteSelector = None,
    delta: int = 1,
    activation: str = "sigmoid",
    psi_init: PsiInit = 0.1,
    learnable_psi: bool = True,
    attention_kwargs: dict[str, Any] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf_modules: Any = None,
    preset: str | None = None,
    convert_existing: bool = False,
    norm_fused: bool | None = None,
    check: bool = True,
) -> fx.GraphModule:
    """Trace ``model``, find the ASR sites and put an ASR block at each; returns a trainable GraphModule.

    ``model`` is not modified (the result holds copies of its modules, under the same names).
    Blocks live at ``asr.<site key>`` (e.g. ``asr.layer1_0_bn3``); with ``delta > 1`` each site
    holds an ``nn.Sequential`` of ``delta`` blocks (the paper's Table 7).

    Args:
        attention: a registered name (``asr_fx.attention.names()``) or a factory ``f(channels, **kw)``.
        rule: placement rule; ``"auto"`` picks the paper's placement (see ``RULES``).
        sites / exclude: node or module names, or a predicate on :class:`Site`, to choose sites.
        example_inputs: optional; shapes let layers whose channel dimension depends on the input
            rank (BatchNorm1d, GroupNorm, ...) take a site.
        leaf_modules: module names or classes that torch.fx keeps as opaque calls.
        delta / activation / psi_init / learnable_psi: ASR blocks per site (Table 7), ``"sigmoid"``,
            ``"tanh"`` or ``"hardsigmoid"``, psi's start (a number or ``("normal", std)``), and
            ``False`` to keep psi fixed (Table 8).
        preset: a named setting of :data:`asr_fx.asr.PRESETS`; ``"transformer"`` is the paper's ViT
            setting (tanh, psi and the attention layers' parameters initialised to 1e-3). With no
            preset, defaults for activation/psi_init and only ``transformer``-rule sites (ViT, Swin),
            the transformer preset is used (recorded in the config); ``preset="cnn"`` keeps sigmoid.
        convert_existing: also turn each existing channel attention (SE/ECA-like ``x * gate(pool(x))``,
            found by :func:`asr_fx.passes.find_channel_attention`) into its ASR form at
            ``asr.<attention module path>``: the same network, fed by a learnable psi. psi starts
            at the batch mean of the pooled values on ``example_inputs`` when given, else at ``psi_init``.
        norm_fused: the training form at BatchNorm sites. ``True``: a block right after an affine
            ``nn.BatchNorm`` computes that BN with affine ``weight * v, bias * v``
            (:class:`asr_fx.asr.NormFusedASR`: the same function, but BN's output is not kept for the
            backward of ``x * v``, so training costs about what the vanilla model does); other sites keep
            ``x * v``. Needs ``delta=1``. ``False``: every block is ``x * v``. ``None`` (default):
            ``True`` when ``delta == 1``. State_dict keys and :func:`fuse`'s result are the same either way.
        check: before returning, check on ``example_inputs`` (or a probe derived from the first layer) that
            the result with every ``v = 1`` computes what ``model`` computes, in eval and train mode
            (:mod:`asr_fx.equivalence`; raises :class:`asr_fx.errors.EquivalenceError`). ``False`` skips it.
    """
    options = {k: v for k, v in locals().items() if k != "model"}  # for instrument_parts
    if norm_fused is None:
        norm_fused = delta == 1
    if norm_fused and delta != 1:
        raise InvalidOptionError(f"norm_fused=True puts one block inside each BatchNorm and needs delta=1, got "
                                 f"delta={delta}; drop norm_fused or use delta=1")
    activation, psi_init, _ = resolve_preset(preset, activation, psi_init)
    if delta < 1:
        raise InvalidOptionError(f"delta is the number of ASR blocks per site and must be >= 1, got {delta}")
    example_inputs = as_input_tuple(example_inputs)
    try:
        gm = trace(copy.deepcopy(model), leaf_modules)
    except TraceError as exc:  # the whole forward does not trace: instrument its capturable parts in place
        return instrument_parts(model, exc, instrument, options)
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    chosen = _select_sites(gm, rule, sites, exclude)
    existing = find_channel_attention(gm) if convert_existing else []
    if not chosen and not existing:
        looked = LOOKS_FOR.get(RULE_ALIASES.get(rule, rule), "the sites named by sites=") if sites is None else \
            "the sites named by sites=, less exclude="
        raise NoSitesError(
            f"no ASR site found in {type(model).__name__} with rule={rule!r}: looked for {looked}. "
            f"Pass sites=[module names] or another rule (one of {sorted(RULES)})."
        )
    unfoldable = [f"{s.node} ({s.reason})" for s in chosen if not s.foldable]
    if unfoldable:
        raise ASRError(f"sites {unfoldable} cannot fold after training; leave them out with exclude=[...]"
                       + (" or pass example_inputs=" if any("example_inputs" in u for u in unfoldable) else ""))
    if preset is None and chosen and all(s.rule == "transformer" for s in chosen) and \
            (activation, psi_init) == ("sigmoid", 0.1):
        preset = "transformer"  # the paper's ViT setting for transformer sites
        activation, psi_init, _ = resolve_preset(preset, activation, psi_init)
    kwargs = dict(attention_kwargs or {})

    def make_block(site: Site) -> nn.Module:
        return make_site_block(site.channels, site.channel_pos, attention, delta=delta, activation=activation,
                               psi_init=psi_init, learnable_psi=learnable_psi, attention_kwargs=kwargs,
                               preset=preset)

    psi_values = pooled_means(gm, existing, example_inputs) if existing and example_inputs is not None else None
    insert_asr(gm, chosen, make_block)
    if existing:
        existing = find_channel_attention(gm)  # node names are kept; the scaled tensors may now be ASR outputs
        convert_existing_attention(gm, existing, psi_init=psi_init if isinstance(psi_init, (int, float)) else 0.1,
                                   psi_values=psi_values, learnable_psi=learnable_psi)
    if norm_fused:
        into_norm_fused(gm)
    insert_values_first(gm)
    config = {
        "attention": _attention_name(attention),
        "attention_kwargs": kwargs,
        "rule": rule,
        "delta": delta,
        "activation": activation,
        "psi_init": list(psi_init) if isinstance(psi_init, tuple) else psi_init,
        "learnable_psi": learnable_psi,
        "preset": preset,
        "convert_existing": convert_existing,
        "norm_fused": norm_fused,
        "sites": [s.to_dict() for s in chosen],
        "factory": getattr(model, "_asr_fx_factory", None),
        "input_shape": list(example_inputs[0].shape) if example_inputs else None,
    }
    set_config(gm, config)
    _place_like(gm, model)
    gm.train(model.training)
    if check and not existing:  # converted existing attention changes the function on purpose
        check_instrumented(model, gm, example_inputs)
    return gm


def _place_like(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put the new ASR state on the model's device, and ASR blocks in its floating dtype."""
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    if ref is None:
        return
    if ref.device.type != "cpu":
        gm.to(ref.device)
    blocks = getattr(gm, "asr", None)
    if isinstance(blocks, nn.Module) and ref.is_floating_point() and ref.dtype != torch.float32:
        blocks.to(ref.dtype)


def set_config(gm: nn.Module, config: dict[str, Any]) -> None:
    """Record the ASR config on a module (kept across ``copy.deepcopy`` and pickling)."""
    if isinstance(gm, fx.GraphModule):
        gm.meta[CONFIG_KEY] = config
    gm.asr_fx_config = config


def get_config(model: nn.Module) -> dict[str, Any] | None:
    """The config :func:`instrument` recorded on ``model``, or ``None``."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and CONFIG_KEY in meta:
        return meta[CONFIG_KEY]
    return getattr(model, "asr_fx_config", None)


def _is_asr_module(module: nn.Module) -> bool:
    return isinstance(module, ASR)


def fuse(
    model: nn.Module,
    strict: bool = False,
    *,
    fold_bn: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    leaf_modules: Any = None,
    check: bool = True,
) -> fx.GraphModule:
    """Fold every constant per-channel scale (every ASR block) into its layer; returns a new GraphModule.

    ``model`` is not modified. The result is in eval mode and computes what ``model.eval()``
    computes. Every constant per-channel ``mul`` (ASR blocks, layer scales) folds into the layer
    before it, or is pushed forward through ReLU/pooling/flatten into the next conv/linear/BN
    (``example_inputs`` give the shapes that reshapes and rank-dependent norms need). Sites that
    could not be folded stay as one constant ``mul`` and are reported with a
    warning (``asr_fx.fusion_report(fused)`` has the details); ``strict=True`` raises
    :class:`asr_fx.FusionError` instead. ``fold_bn=True`` also folds BatchNorm into the conv before it.
    ``check`` (default): the result is checked against ``model`` in eval mode on ``example_inputs`` (or the
    input shape ``instrument`` recorded) and :class:`asr_fx.errors.EquivalenceError` names the first layer
    that differs; ``False`` skips it.
    """
    if is_partial(model):  # instrumented part by part (asr_fx.partial_capture): fuse each part in place
        return fuse_parts(model, fuse, strict=strict, fold_bn=fold_bn, example_inputs=example_inputs, check=check)
    work = copy.deepcopy(model).eval()
    norm_fused_records = []  # norm_fused blocks go back to BN(x) with v in BN's affine, then fuse as usual
    for graph_module in [m for m in work.modules() if isinstance(m, fx.GraphModule)]:
        remove_values_first(graph_module)
        norm_fused_records += out_of_norm_fused(graph_module)
    gm = trace(work, leaf_modules, bind_training=False)  # the fused graph is for inference
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    gm, records = fuse_pipeline(gm, fold_bn=fold_bn, check=_check_finite)
    report = FusionReport(norm_fused_records + records)
    gm.meta["asr_fx.fusion"] = report
    if report.unfolded:
        message = report.unfolded_message()
        if strict:
            from asr_fx.errors import FusionError

            raise FusionError(message)
        warnings.warn(message, stacklevel=2)
    if check:
        check_fused(model, gm.eval(), example_inputs)
    return gm.eval()


def _check_finite(gm: fx.GraphModule) -> None:
    """Refuse NaN/Inf constants computed from psi: folding them would poison the weights."""
    from asr_fx.passes.fold import site_of

    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("_folded_"):
            value = getattr(gm, str(node.target))
            if not torch.isfinite(value).all():
                where = site_of(node) or node.name
                raise ASRError(f"the attention value at site `{where}` is not finite (NaN/Inf): the checkpoint's "
                               "psi or attention weights are broken; retrain or restore them before fusing")


def fusion_report(fused: nn.Module) -> FusionReport | None:
    """The :class:`FusionReport` that :func:`fuse` attached to its result."""
    meta = getattr(fused, "meta", {})
    return meta.get("asr_fx.fusion") if isinstance(meta, dict) else None


def asr_parameters(model: nn.Module) -> list[nn.Parameter]:
    """psi and the attention networks' parameters of every ASR block (e.g. for a no-weight-decay group)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if _is_asr_module(module):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["asr_parameters", "find_sites", "fuse", "fusion_report", "get_config", "instrument"]

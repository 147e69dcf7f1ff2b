"""``instrument`` and ``find_sites``: trace a model, choose the ASR sites, put a block at each.

``instrument`` runs :data:`asr_fx.passes.pipelines.INSTRUMENT_PIPELINE`, a declared list of passes
(``(module, context) -> PassResult``, run by :class:`asr_fx.passes.infra.Pipeline`), then records the config on
the result.
The placement rules come from the one registry :data:`asr_fx.passes.placement.rules.PLACEMENT_RULES`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.asr import ASR, PsiInit, make_site_block, resolve_preset
from asr_fx.attention import resolved_widths
from asr_fx.config import ASRConfig, set_config
from asr_fx.equivalence import check_instrumented
from asr_fx.errors import InvalidOptionError, TraceError
from asr_fx.partial_capture import instrument_parts
from asr_fx.passes import Site, trace
from asr_fx.passes.capture.shapes import as_input_tuple, record_shapes
from asr_fx.passes.forms.convert_existing import existing_attention_sites
from asr_fx.passes.pipelines import INSTRUMENT_PIPELINE, BlockFactory, SiteBlocks
from asr_fx.passes.placement.select import SiteSelector, select_sites


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
    example_inputs = as_input_tuple(example_inputs)
    gm = trace(copy.deepcopy(model), leaf_modules, example_inputs=example_inputs)
    if example_inputs is not None:
        record_shapes(gm, example_inputs)
    chosen = select_sites(gm, rule, sites, exclude)
    return chosen + (existing_attention_sites(gm) if existing else [])


@dataclass(frozen=True)
class BlockSettings:
    """The settings every block of one ``instrument`` call gets, after presets are applied."""

    activation: str
    psi_init: PsiInit
    preset: str | None


def block_settings(options: dict[str, Any], sites: Sequence[Site]) -> BlockSettings:
    """``activation``/``psi_init``/``preset`` after the preset; with no preset and only ``transformer``-rule
    sites, the paper's ViT setting (the ``transformer`` preset) unless activation/psi_init were set."""
    preset = options["preset"]
    activation, psi_init, _ = resolve_preset(preset, options["activation"], options["psi_init"])
    if preset is None and sites and all(s.rule == "transformer" for s in sites) and \
            (activation, psi_init) == ("sigmoid", 0.1):
        preset = "transformer"
        activation, psi_init, _ = resolve_preset(preset, activation, psi_init)
    return BlockSettings(activation, psi_init, preset)


def site_blocks(options: dict[str, Any]) -> BlockFactory:
    """The ``blocks`` option of :data:`INSTRUMENT_PIPELINE`: once the sites are chosen, each site's block
    from the registry (:func:`make_site_block`) with the settings after presets (:func:`block_settings`)."""

    def blocks(sites: Sequence[Site]) -> SiteBlocks:
        settings = block_settings(options, sites)

        def make_block(site: Site) -> nn.Module:
            return make_site_block(site.channels, site.channel_pos, options["attention"], delta=options["delta"],
                                   activation=settings.activation, psi_init=settings.psi_init,
                                   learnable_psi=options["learnable_psi"],
                                   attention_kwargs=options["attention_kwargs"], preset=settings.preset)

        psi_init = settings.psi_init
        return SiteBlocks(make_block, psi_init if isinstance(psi_init, (int, float)) else 0.1)

    return blocks


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
    bn_affine_form: bool | None = None,
    check: bool = True,
) -> nn.Module:
    """Trace ``model``, find the ASR sites and put an ASR block at each; returns a trainable GraphModule.

    ``model`` is not modified (the result holds copies of its modules, under the same names).
    Blocks live at ``asr.<site node>`` (e.g. ``asr.layer1_0_bn3``); with ``delta > 1`` each site
    holds an ``nn.Sequential`` of ``delta`` blocks (the paper's Table 7).

    Args:
        attention: a registered name (``asr_fx.attention.names()``) or a factory ``f(channels, **kw)``.
        rule: placement rule; ``"auto"`` picks the paper's placement (see
            :data:`asr_fx.passes.placement.rules.PLACEMENT_RULES`).
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
        bn_affine_form: the BN-affine *training form* at BatchNorm sites (a way to train, not a fused
            model). ``True``: a block right after an affine
            ``nn.BatchNorm`` computes that BN with affine ``weight * v, bias * v``
            (:class:`asr_fx.asr.BatchNormAffineASR`: the same function, but BN's output is not kept for the
            backward of ``x * v``, so training costs about what the vanilla model does); other sites keep
            ``x * v``. Needs ``delta=1``. ``False``: every block is ``x * v``. ``None`` (default):
            ``True`` when ``delta == 1``. State_dict keys and :func:`fuse`'s result are the same either way.
        check: before returning, check on ``example_inputs`` (or a probe derived from the first layer) that
            the result with every ``v = 1`` computes what ``model`` computes, in eval and train mode
            (:mod:`asr_fx.equivalence`; raises :class:`asr_fx.errors.EquivalenceError`). ``False`` skips it.

    When the whole forward does not trace (detector post-processing, a YOLO head, shape checks torch.fx
    cannot follow), the largest capturable children are instrumented in place and the model's own class
    is returned with those parts replaced (:mod:`asr_fx.partial_capture`).
    """
    options = {k: v for k, v in locals().items() if k != "model"}  # for instrument_parts
    if bn_affine_form is None:
        bn_affine_form = delta == 1
    if bn_affine_form and delta != 1:
        raise InvalidOptionError(f"bn_affine_form=True puts one block inside each BatchNorm and needs delta=1, got "
                                 f"delta={delta}; drop bn_affine_form or use delta=1")
    resolve_preset(preset, activation, psi_init)  # refuses a preset that contradicts activation/psi_init
    if delta < 1:
        raise InvalidOptionError(f"delta is the number of ASR blocks per site and must be >= 1, got {delta}")
    example_inputs = as_input_tuple(example_inputs)
    pipeline_options = dict(model_name=type(model).__name__, attention=attention, rule=rule, sites=sites,
                            exclude=exclude, delta=delta, activation=activation, psi_init=psi_init,
                            learnable_psi=learnable_psi, attention_kwargs=dict(attention_kwargs or {}),
                            example_inputs=example_inputs, leaf_modules=leaf_modules, preset=preset,
                            convert_existing=convert_existing, bn_affine_form=bn_affine_form)
    pipeline_options["blocks"] = site_blocks(pipeline_options)
    try:
        gm, records = INSTRUMENT_PIPELINE.run(copy.deepcopy(model), **pipeline_options)
    except TraceError as exc:  # the whole forward does not trace: instrument its capturable parts in place
        return instrument_parts(model, exc, instrument, options)
    chosen = [r for r in records if isinstance(r, Site)]
    kwargs = pipeline_options["attention_kwargs"]  # the built widths are recorded, so a checkpoint rebuilds them
    kwargs.update(resolved_widths(((m.channels, m.attention) for m in gm.modules() if isinstance(m, ASR)), kwargs))
    settings = block_settings(pipeline_options, chosen)
    config = ASRConfig(
        attention=attention_name(attention),
        attention_kwargs=kwargs,
        rule=rule,
        delta=delta,
        activation=settings.activation,
        psi_init=list(settings.psi_init) if isinstance(settings.psi_init, tuple) else settings.psi_init,
        learnable_psi=learnable_psi,
        preset=settings.preset,
        convert_existing=convert_existing,
        bn_affine_form=bn_affine_form,
        sites=[s.to_dict() for s in chosen],
        factory=getattr(model, "_asr_fx_factory", None),
        input_shape=list(example_inputs[0].shape) if example_inputs and isinstance(example_inputs[0], torch.Tensor)
        else None,
    )
    set_config(gm, config)
    place_like(gm, model)
    gm.train(model.training)
    if check and not convert_existing:  # converted existing attention changes the function on purpose
        check_instrumented(model, gm, example_inputs)
    return gm


def attention_name(attention: Any) -> Any:
    """How the config names an attention: its registry name, or ``module:qualname`` of a factory."""
    if isinstance(attention, str):
        return attention
    module, qualname = getattr(attention, "__module__", None), getattr(attention, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname and "<" not in qualname else None


def _floating_dtype(module: nn.Module | None) -> torch.dtype | None:
    for t in (*module.parameters(), *module.buffers()) if module is not None else ():
        if t.is_floating_point():
            return t.dtype
    return None


def _site_dtype(gm: fx.GraphModule, block_call: fx.Node) -> torch.dtype | None:
    """The dtype of the value an ASR block scales: recorded by shape propagation, else the dtype of the
    parameters of the layer that produced it."""
    value = block_call.args[0] if block_call.args else None
    if not isinstance(value, fx.Node):
        return None
    recorded = getattr(value.meta.get("tensor_meta"), "dtype", None)
    if recorded is not None:
        return recorded
    return _floating_dtype(gm.get_submodule(str(value.target))) if value.op == "call_module" else None


def place_like(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put the new ASR state on the model's device, and each ASR block in the dtype of the value it
    scales at its own site (not the dtype of some other parameter of the model)."""
    ref: torch.Tensor | None = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    if ref is None:
        return
    if ref.device.type != "cpu":
        gm.to(ref.device)
    blocks = getattr(gm, "asr", None)
    if not isinstance(blocks, nn.Module):
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("asr."):
            dtype = _site_dtype(gm, node) or (ref.dtype if ref.is_floating_point() else None)
            if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
                gm.get_submodule(str(node.target)).to(dtype)

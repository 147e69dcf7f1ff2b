"""``instrument`` and ``find_sites``: trace a model, choose the ASR sites, put a block at each.

``instrument`` runs :data:`asr_fx.passes.pipelines.INSTRUMENT_PIPELINE`, a declared list of passes
(``(module, context) -> PassResult``, run by :class:`asr_fx.passes.infra.Pipeline`), then records the config on
the result.
The placement rules come from the one registry :data:`asr_fx.passes.placement.rules.PLACEMENT_RULES`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx._util import copy_of
from asr_fx.asr import ASR, PsiInit, make_site_block, resolve_preset
from asr_fx.attention import resolved_widths
from asr_fx.config import ASRConfig, set_config
from asr_fx.equivalence import check_instrumented, expected_outputs, input_like, random_probe
from asr_fx.errors import ASRError, InvalidOptionError, NoSitesError, TraceError
from asr_fx.input_shapes import default_input_shape
from asr_fx.leaf_spec import record_leaves
from asr_fx.own_model import attach_blocks, keep_leaf_modules, place_like, plan, remove, tree_copy
from asr_fx.partial_capture import in_parts, instrument_parts, names_parts
from asr_fx.passes import Site, trace
from asr_fx.passes.capture.shapes import as_input_tuple, record_shapes
from asr_fx.passes.forms.convert_existing import existing_attention_sites
from asr_fx.passes.infra import PassResult, Pipeline
from asr_fx.passes.pipelines import (  # noqa: F401 - INSTRUMENT_PIPELINE: its old home
    GRAPH_FORM_PIPELINE,
    INSTRUMENT_PIPELINE,
    READ_PIPELINE,
    BlockFactory,
    InstrumentOptions,
    SiteBlocks,
)
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
    gm = trace(copy_of(model), leaf_modules, example_inputs=example_inputs)
    if example_inputs is not None:
        record_shapes(gm, example_inputs)
    chosen = select_sites(gm, rule, sites, exclude)
    return chosen + (existing_attention_sites(gm) if existing else [])


@dataclass(frozen=True)
class BlockOptions:
    """What one ``instrument`` call asks of every block, before presets are applied."""

    attention: str | Callable[..., nn.Module]
    delta: int
    activation: str
    psi_init: PsiInit
    learnable_psi: bool
    attention_kwargs: dict[str, Any]
    preset: str | None


@dataclass(frozen=True)
class BlockSettings:
    """The settings every block of one ``instrument`` call gets, after presets are applied."""

    activation: str
    psi_init: PsiInit
    preset: str | None


def block_settings(options: BlockOptions, sites: Sequence[Site]) -> BlockSettings:
    """``activation``/``psi_init``/``preset`` after the preset; with no preset and only ``transformer``-rule
    sites, the paper's ViT setting (the ``transformer`` preset) unless activation/psi_init were set."""
    preset = options.preset
    activation, psi_init, _ = resolve_preset(preset, options.activation, options.psi_init)
    if preset is None and sites and all(s.rule == "transformer" for s in sites) and \
            (activation, psi_init) == ("sigmoid", 0.1):
        preset = "transformer"
        activation, psi_init, _ = resolve_preset(preset, activation, psi_init)
    return BlockSettings(activation, psi_init, preset)


def site_blocks(options: BlockOptions) -> BlockFactory:
    """The ``blocks`` option of :data:`INSTRUMENT_PIPELINE`: once the sites are chosen, each site's block
    from the registry (:func:`make_site_block`) with the settings after presets (:func:`block_settings`)."""

    def blocks(sites: Sequence[Site]) -> SiteBlocks:
        settings = block_settings(options, sites)

        def make_block(site: Site) -> nn.Module:
            return make_site_block(site.channels, site.channel_pos, options.attention, delta=options.delta,
                                   activation=settings.activation, psi_init=settings.psi_init,
                                   learnable_psi=options.learnable_psi, attention_kwargs=options.attention_kwargs,
                                   preset=settings.preset)

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
    inplace: bool = False,
) -> nn.Module:
    """Trace ``model``, find the ASR sites and put an ASR block at each; returns the user's own model with ASR in it.

    The result is a copy of ``model`` (``inplace=True``: ``model`` itself), of the same class, with every
    attribute, method, keyword argument and output type: the graph only reads the model, the blocks are
    attached to its modules (:mod:`asr_fx.own_model`): the module whose output a site is gets a subclass of
    its class whose forward is its own, then the block (the output form: torch.fx tracers and feature
    extractors record the block and its parameters), or at an affine BatchNorm the BN-affine training form
    (``bn_affine_form``, a BatchNorm subclass).
    Blocks live at ``asr.<site node>`` (e.g. ``asr.layer1_0_bn3``): state_dict keys are the vanilla
    keys plus ``asr.*``; with ``delta > 1`` each site holds an ``nn.Sequential`` of ``delta`` blocks
    (the paper's Table 7).

    Where a site is no module's output (functional code, a module called twice, a composite layer the
    trace went through) or with ``convert_existing=True``, the result is a GraphModule as in earlier
    versions (the *graph form*), with a warning and the reason in the config (``graph_reason``);
    ``inplace=True`` refuses that with :class:`~asr_fx.errors.ASRError` instead.

    Args:
        attention: a registered name (``asr_fx.attention.names()``) or a factory ``f(channels, **kw)``.
        rule: placement rule; ``"auto"`` picks the paper's placement (see
            :data:`asr_fx.passes.placement.PLACEMENT_RULES`).
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
        bn_affine_form: the BN-affine *training form* at BatchNorm sites (not a fused model; the name is
            kept for compatibility). ``True``: a block right after an affine
            ``nn.BatchNorm`` computes that BN with affine ``weight * v, bias * v``
            (:class:`asr_fx.asr.BatchNormAffineASR`: the same function, but BN's output is not kept for the
            backward of ``x * v``, so training costs about what the vanilla model does); other sites keep
            ``x * v``. Needs ``delta=1``. ``False``: every block is ``x * v``. ``None`` (default):
            ``True`` when ``delta == 1``. State_dict keys and :func:`fuse`'s result are the same either way.
        inplace: attach the blocks to ``model`` itself and return it (no copy: big models).
        check: before returning, check on ``example_inputs`` (or a probe derived from the first layer) that
            the result with every ``v = 1`` computes what ``model`` computes, in eval and train mode
            (:mod:`asr_fx.equivalence`; raises :class:`asr_fx.errors.EquivalenceError`). ``False`` skips it.

    When the whole forward does not trace without ``example_inputs`` and the model documents its input size
    (timm's ``pretrained_cfg["input_size"]``, a Hugging Face config's ``image_size`` and ``num_channels``), it
    is captured shape-aware on a random input of that size. When the whole forward does not trace (detector
    post-processing, a YOLO head, shape checks torch.fx cannot follow), the largest capturable children are
    instrumented in place and the model's own class is returned with those parts replaced
    (:mod:`asr_fx.partial_capture`).
    """
    options = {k: v for k, v in locals().items() if k != "model"}
    return instrument_one(model, options, graph_ok=not inplace)


def instrument_graph_form(model: nn.Module, attention: Any = "se", **kwargs: Any) -> fx.GraphModule:
    """:func:`instrument`'s graph form (a GraphModule whose graph calls the blocks), for tools that rewrite
    the blocks in the graph (:func:`asr_fx.stripe.plain_attention`); takes :func:`instrument`'s arguments."""
    options = {**dict(inspect.signature(instrument).parameters.items()), **kwargs, "attention": attention}
    options = {k: (v.default if isinstance(v, inspect.Parameter) else v) for k, v in options.items() if k != "model"}
    return instrument_one(model, options, graph_ok=True, graph_form="requested")  # type: ignore[return-value]


def instrument_one(model: nn.Module, options: dict[str, Any], graph_ok: bool,
                   graph_form: str | None = None) -> nn.Module:
    """:func:`instrument` with its keyword arguments in ``options``; ``graph_ok``: the graph form may be
    returned where the module form has no place (else :class:`ASRError`); ``graph_form``: a reason to
    return the graph form anyway (no warning)."""
    o = options
    bn_affine_form, delta, example_inputs = o["bn_affine_form"], o["delta"], as_input_tuple(o["example_inputs"])
    if bn_affine_form is None:
        bn_affine_form = delta == 1
    if bn_affine_form and delta != 1:
        raise InvalidOptionError(f"bn_affine_form=True puts one block inside each BatchNorm and needs delta=1, got "
                                 f"delta={delta}; drop bn_affine_form or use delta=1")
    resolve_preset(o["preset"], o["activation"], o["psi_init"])  # refuses a preset that contradicts the rest
    if delta < 1:
        raise InvalidOptionError(f"delta is the number of ASR blocks per site and must be >= 1, got {delta}")
    kwargs = dict(o["attention_kwargs"] or {})  # the built widths are added by _config
    block_options = BlockOptions(o["attention"], delta, o["activation"], o["psi_init"], o["learnable_psi"], kwargs,
                                 o["preset"])
    pipeline_options = InstrumentOptions(type(model).__name__, site_blocks(block_options), rule=o["rule"],
                                         sites=o["sites"], exclude=o["exclude"], learnable_psi=o["learnable_psi"],
                                         convert_existing=o["convert_existing"], bn_affine_form=bn_affine_form,
                                         example_inputs=example_inputs, leaf_modules=o["leaf_modules"])
    try:
        if names_parts(o["sites"]):  # the sites of a model captured part by part (its config, a checkpoint)
            raise TraceError("the sites name parts of the model")
        # the one copy: traced here, then the result (module form) once restored; inplace=True traces a tree
        # copy that shares the model's tensors (no tensor memory), the blocks then go into the model itself
        traced = tree_copy(model) if o["inplace"] else copy_of(model)
        tree = _module_tree(traced)
        gm, records = READ_PIPELINE.run(traced, pipeline_options)
    except TraceError as exc:  # the whole forward does not trace: instrument its capturable parts in place
        documented = _documented_inputs(model) if example_inputs is None and not names_parts(o["sites"]) else None
        if documented is not None:  # shape-aware capture on the input the model's own config documents
            return instrument_one(model, {**options, "example_inputs": documented}, graph_ok, graph_form)
        return instrument_parts(model, exc, instrument_one, {**options, "bn_affine_form": bn_affine_form})
    except NoSitesError as exc:  # sites may be inside modules kept whole for their train-only code: capture parts
        if not exc.opaque_modules or example_inputs is None or o.get("in_part"):
            raise
        try:
            return instrument_parts(model, TraceError(str(exc)), instrument_one,
                                    {**options, "bn_affine_form": bn_affine_form})
        except TraceError:
            raise exc from None
    chosen = [r for r in records if isinstance(r, Site)]
    config = _config(model, gm, chosen, block_options, pipeline_options)
    found = graph_form or (plan(gm, chosen, model, bn_affine_form) if not o["convert_existing"] else
                           "convert_existing=True rewrites the model's own attention inside its forward")
    parts = in_parts(model, found, gm, chosen, instrument_one, {**options, "bn_affine_form": bn_affine_form}) \
        if isinstance(found, str) and not graph_form and not o["convert_existing"] else None
    if parts is not None:
        return parts
    if isinstance(found, str):
        return _graph_form(model, gm, records, config, found, pipeline_options, graph_ok or bool(graph_form),
                           o["check"], warn=not graph_form)
    own = model if o["inplace"] else _restored(traced, tree)
    expected = expected_outputs(model, example_inputs) if o["check"] and own is model else None
    attach_blocks(own, gm, found)
    config.form = "module"
    set_config(own, config)
    keep_leaf_modules(own, o["leaf_modules"])
    if o["check"] and (own is not model or expected is not None):
        try:
            check_instrumented(model if expected is None else expected, own, example_inputs)
        except BaseException:
            remove(own)
            raise
    return own


def _module_tree(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], set[str]]]:
    """Each module of ``model`` with its children, parameters and buffers and its attribute names, so that
    :func:`_restored` can undo what tracing did to the modules it shares with the GraphModule (plain twins of
    composite layers set on their parents, torch.fx's tensor constants set on the root)."""
    return [(m, {"_modules": dict(m._modules), "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)},
             set(vars(m))) for m in model.modules()]


def _restored(model: nn.Module, tree: list[tuple[nn.Module, dict[str, Any], set[str]]]) -> nn.Module:
    """``model`` with every module as :func:`_module_tree` recorded it."""
    for module, kept, names in tree:
        for name in set(vars(module)) - names:
            delattr(module, name)
        for key, value in kept.items():
            getattr(module, key).clear()
            getattr(module, key).update(value)
    return model


def _graph_form(model: nn.Module, gm: fx.GraphModule, records: list[Any], config: ASRConfig, reason: str,
                pipeline_options: InstrumentOptions, graph_ok: bool, check: bool, warn: bool = True) -> fx.GraphModule:
    """The graph form (a GraphModule holding the model's modules; earlier versions' only form), with a
    warning saying why; refused with :class:`ASRError` unless ``graph_ok``."""
    name = type(model).__name__
    if not graph_ok:
        raise ASRError(f"instrument(..., inplace=True) cannot keep {name} itself: {reason}. Way out: leave "
                       "inplace off (a GraphModule is returned), or exclude=[...] those sites")
    if warn:
        warnings.warn(f"instrument returns a GraphModule, not a {name}: {reason}. The model's own methods, "
                      "attributes and keyword arguments are not kept; exclude=[...] those sites to keep them",
                      stacklevel=4)
    seeded = Pipeline("instrument-graph-form", (lambda m, c: PassResult(m, tuple(records)),
                                               *GRAPH_FORM_PIPELINE.passes))
    gm, _ = seeded.run(gm, pipeline_options)
    config.form, config.graph_reason = "graph", reason
    set_config(gm, config)
    place_like(gm, model)
    gm.train(model.training)
    if check and not pipeline_options.convert_existing:  # converted existing attention changes the function
        check_instrumented(model, gm, pipeline_options.example_inputs)
    return gm


def _config(model: nn.Module, gm: fx.GraphModule, chosen: list[Site], block_options: BlockOptions,
            o: InstrumentOptions) -> ASRConfig:
    kwargs = block_options.attention_kwargs  # the built widths are recorded, so a checkpoint rebuilds them
    kwargs.update(resolved_widths(((m.channels, m.attention) for m in gm.modules() if isinstance(m, ASR)), kwargs))
    settings = block_settings(block_options, chosen)
    example_inputs = o.example_inputs
    return ASRConfig(
        attention=attention_name(block_options.attention),
        attention_kwargs=kwargs,
        rule=o.rule,
        delta=block_options.delta,
        activation=settings.activation,
        psi_init=list(settings.psi_init) if isinstance(settings.psi_init, tuple) else settings.psi_init,
        learnable_psi=o.learnable_psi,
        preset=settings.preset,
        convert_existing=o.convert_existing,
        bn_affine_form=o.bn_affine_form,
        sites=[s.to_dict() for s in chosen],
        factory=getattr(model, "_asr_fx_factory", None),
        input_shape=list(example_inputs[0].shape) if example_inputs and isinstance(example_inputs[0], torch.Tensor)
        else None,
        leaf_modules=record_leaves(o.leaf_modules),
    )


def _documented_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """A random input of the size the model documents (timm's ``pretrained_cfg``, a Hugging Face config's
    ``image_size``/``num_channels``, ...: :func:`asr_fx.input_shapes.default_input_shape`), batch 2."""
    shape = default_input_shape(model, batch=2)
    ref = input_like(model)
    if not shape or ref is None or not ref.is_floating_point() or ref.is_meta:
        return None
    return (random_probe(shape, ref),)


def attention_name(attention: Any) -> Any:
    """How the config names an attention: its registry name, or ``module:qualname`` of a factory."""
    if isinstance(attention, str):
        return attention
    module, qualname = getattr(attention, "__module__", None), getattr(attention, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname and "<" not in qualname else None

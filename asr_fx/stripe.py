"""The Stripe Observation, measured: what input-dependent channel attention outputs on real data,
and that attention frozen into a constant after training.

The paper's premise (Fig. 1): the output ``v = act(F(GAP(x)))`` of a trained channel-attention
module (SE, ECA, ...) is nearly the same vector for every input; per channel, its std across
inputs is near 0 while the pooled input features vary a lot.

- :func:`collect` runs a model on batches and records, at every attention site found by
  :func:`asr_fx.passes.placement.attention_patterns.find_channel_attention`, the attention values per input
  (``N x C``) and the pooled input of the attention network (``N x C``), with their per-channel
  statistics (:class:`SiteStats`, :class:`StripeStats`).
- :func:`asr_fx.freeze.freeze_attention` (in :mod:`asr_fx.freeze`) replaces each such attention by the mean ``v``
  it produced on the data:
  ``x * act(F(GAP(x)))`` becomes ``x * v`` with ``v`` a constant buffer, so :func:`asr_fx.fuse`
  folds ``v`` into the layer that produced ``x`` (or reports the site where it cannot). The
  attention's inference cost is gone with no retraining; :class:`FreezeReport` says per site the
  std the freeze ignores and how much the model's output moved on held-out data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from asr_fx._util import psi_shape_of
from asr_fx.instrument_model import instrument_graph_form
from asr_fx.asr import ACTIVATIONS, ASR
from asr_fx.attention import SqueezeExcite
from asr_fx.config import set_config
from asr_fx.errors import AttentionNetworkError, InvalidOptionError, NoSitesError, TraceError, UnknownSiteError
from asr_fx.passes import trace
from asr_fx.passes.fold.constant_fold import FOLDED_PREFIX
from asr_fx.passes.forms.hoist_attention_values import unhoist_attention_values
from asr_fx.passes.graph.modes import preserved_training_modes
from asr_fx.passes.placement.attention_patterns import find_channel_attention

#: prefix of the buffers holding frozen attention values; a kind of folded constant, so
#: :func:`asr_fx.fuse` reports the sites as attention sites and cleans up buffers it folded
FROZEN_PREFIX = FOLDED_PREFIX + "stripe_"

Batches = Iterable[Any]


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model inputs in one batch: a tensor, or the first item of an ``(x, y)`` tuple/list."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return (batch[key],)
    raise InvalidOptionError("a batch must be a tensor, an (inputs, targets) pair or a dict with 'x'/'inputs'; "
                             f"got {type(batch).__name__}")


@dataclass
class SiteStats:
    """What one channel-attention site produced on the data.

    ``values``: the attention value per input (``N x C``, after the sigmoid); ``pooled``: the
    attention network's pooled input per input (``N x C``), i.e. the features before the attention.
    ``site``: the attention module's path (or the multiply's node name); ``mul``/``gate``/``pool``/
    ``feature``: graph node names; ``channel_pos``: the scaled dimension counted from the right.
    """

    site: str
    mul: str
    gate: str
    pool: str
    feature: str
    channel_pos: int
    activation: str
    values: torch.Tensor
    pooled: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_inputs(self) -> int:
        return int(self.values.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean attention value ``v`` (``C``): what :func:`freeze_attention` uses."""
        return self.values.mean(0)

    @property
    def std(self) -> torch.Tensor:
        """Per-channel std of the attention values across inputs (``C``; population std)."""
        return _std(self.values)

    @property
    def feature_std(self) -> torch.Tensor:
        """Per-channel std of the pooled input features across inputs (``C``)."""
        return _std(self.pooled)

    @property
    def std_ratio(self) -> float:
        """Mean attention std over mean feature std: well below 1 is the Stripe Observation."""
        return float(self.std.mean() / self.feature_std.mean().clamp_min(1e-30))

    def summary(self) -> dict[str, Any]:
        return {
            "site": self.site, "channels": self.channels, "inputs": self.n_inputs,
            "attention_std_mean": float(self.std.mean()), "attention_std_max": float(self.std.max()),
            "feature_std_mean": float(self.feature_std.mean()), "std_ratio": self.std_ratio,
            "v_mean": float(self.mean.mean()), "v_min": float(self.mean.min()), "v_max": float(self.mean.max()),
        }


def _std(t: torch.Tensor) -> torch.Tensor:
    """Population std over dim 0 in float64 (0 for one input, never NaN; exact 0 for identical rows)."""
    t64 = t.double()
    centred = t64 - t64[:1]  # identical rows give exact zeros whatever the rounding of the mean
    return (centred - centred.mean(0, keepdim=True)).pow(2).mean(0).sqrt().to(t.dtype)


@dataclass
class StripeStats:
    """:class:`SiteStats` for every channel-attention site of a model, in graph order."""

    sites: list[SiteStats] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __getitem__(self, key: int | str) -> SiteStats:
        if isinstance(key, int):
            return self.sites[key]
        for s in self.sites:
            if key in (s.site, s.mul):
                return s
        raise UnknownSiteError(f"no attention site {key!r}; sites: {[s.site for s in self.sites]}")

    def table(self, tablefmt: str = "github") -> str:
        """One row per site: channels, attention std (mean/max over channels), feature std, their ratio."""
        rows = [(s["site"], s["channels"], s["inputs"], f"{s['attention_std_mean']:.3g}",
                 f"{s['attention_std_max']:.3g}", f"{s['feature_std_mean']:.3g}", f"{s['std_ratio']:.3g}",
                 f"{s['v_min']:.3f}..{s['v_max']:.3f}")
                for s in (site.summary() for site in self.sites)]
        headers = ["site", "C", "inputs", "attn std (mean)", "attn std (max)", "feature std (mean)",
                   "std ratio", "mean v range"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.summary() for s in self.sites]}


def values_over_checkpoints(runs: Sequence[StripeStats], site: int | str = 0) -> torch.Tensor:
    """One site's attention values from :func:`collect` runs on several checkpoints of one training
    (same inputs, in order), stacked as ``E x N x C`` for :func:`asr_fx.plot.plot_epoch_difference`."""
    if len(runs) < 2:
        raise InvalidOptionError(f"the change over epochs needs at least two checkpoints, got {len(runs)}")
    values = [run[site].values for run in runs]
    if any(v.shape != values[0].shape for v in values):
        raise InvalidOptionError(f"the checkpoints saw different inputs or channels: shapes "
                                 f"{[tuple(v.shape) for v in values]}; collect every checkpoint on the same batches")
    return torch.stack(values)


class PooledAttention(nn.Module):
    """``x * act(F(mean of x over every dim but the batch and the channel one)))``: an attention
    network of the registry fed by the pooled input, as the original SE/ECA/IE are, instead of by psi.

    The one input-dependent baseline of the project (:func:`plain_attention`, the benchmarks' "SE"
    row). ``channel_pos`` -3 or another channels-first position: ``F`` gets the pooled
    ``(N, C, 1, ...)`` tensor (the mean keeps its dims); -1 (``(N, L, C)`` tokens): the tokens'
    mean, reshaped to ``(N, C, 1, 1)`` for ``F`` and back to ``(N, 1, C)``."""

    def __init__(self, attention: nn.Module, activation: str, channel_pos: int) -> None:
        super().__init__()
        self.attention, self.activation, self.channel_pos = attention, activation, channel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = ACTIVATIONS[self.activation]
        if self.channel_pos == -1:
            n, c = x.shape[0], x.shape[-1]
            pooled = x.mean(tuple(range(1, x.dim() - 1))).reshape(n, c, 1, 1)
            return x * gate(self.attention(pooled)).reshape(n, *([1] * (x.dim() - 2)), c)
        pooled = x.mean(tuple(range(self.channel_pos + 1, 0)), keepdim=True)
        return x * gate(self.attention(pooled))


def input_se(channels: int, channel_pos: int = -3, **se_kwargs: Any) -> PooledAttention:
    """Input-dependent Squeeze-and-Excitation, ``x * sigmoid(F(GAP(x)))`` with asr-fx's ``SqueezeExcite``
    as ``F`` (``se_kwargs`` go to it, e.g. ``min_hidden=8``): the paper's Table 1 "SE" setting, the same
    network ASR feeds with psi."""
    return PooledAttention(SqueezeExcite(channels, **se_kwargs), "sigmoid", channel_pos)


def plain_attention(model: nn.Module, attention: Any = "se", **instrument_kwargs: Any) -> fx.GraphModule:
    """``model`` with input-dependent attention at the sites :func:`asr_fx.instrument` would choose:
    the plain SE/ECA/... baseline of the paper (``instrument`` without ASR), to train and then
    measure with :func:`collect` or freeze with :func:`freeze_attention`.

    Takes the arguments of :func:`asr_fx.instrument`. Refuses attention networks that do not take
    a batch of pooled descriptors (psi shape other than ``(1, C, 1, ...)``, or a network that
    reshapes to one descriptor) and sites without a dimension to pool (channels last).
    """
    gm = instrument_graph_form(model, attention, **{**instrument_kwargs, "bn_affine_form": False})  # blocks replaced
    if not isinstance(gm, fx.GraphModule):
        raise TraceError(f"{type(model).__name__} does not trace whole: plain attention needs one graph",
                         module=None, module_class=type(model).__name__)
    unhoist_attention_values(gm)  # a plain attention block takes x only
    container = gm.get_submodule("asr")
    assert isinstance(container, nn.ModuleDict)
    for key, block in list(container.items()):
        blocks = list(block) if isinstance(block, nn.Sequential) else [block]
        plain = []
        for asr in blocks:
            assert isinstance(asr, ASR)
            shape = psi_shape_of(asr.attention)
            if asr.channel_pos == -1 or shape[0] != 1 or any(d != 1 for d in shape[2:]):
                raise AttentionNetworkError(f"site {key}: attention {attention!r} with psi shape {shape} at channel "
                                            f"dim {asr.channel_pos} has no plain pooled form; use an SE-like "
                                            f"attention on NCHW sites")
            try:
                out = asr.attention(torch.zeros((2,) + shape[1:]))
            except RuntimeError as exc:
                out, why = None, str(exc).splitlines()[0]
            else:
                why = f"output shape {tuple(out.shape)}"
            if out is None or out.shape[0] != 2 or out[0].numel() != asr.channels:
                raise AttentionNetworkError(f"site {key}: attention {attention!r} handles one pooled descriptor, not a "
                                            f"batch ({why}); use one that does, such as 'se'")
            plain.append(PooledAttention(asr.attention, asr.activation, asr.channel_pos))
        container[key] = plain[0] if len(plain) == 1 else nn.Sequential(*plain)
    set_config(gm, None)  # not ASR: asr_fx.save must not record it as such
    return gm


def find_attention(gm: fx.GraphModule) -> list[Any]:
    """The input-dependent channel-attention sites of a traced model (``ChannelAttention`` records)."""
    return find_channel_attention(gm)


def _probe(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of ``gm`` that returns the values of the named nodes (and computes nothing after them)."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes[name] for name in names),)
    probe = fx.GraphModule(gm, graph, "StripeProbe")
    probe.graph.eliminate_dead_code()
    probe.recompile()
    return probe


def collect(model: nn.Module, batches: Batches, *, leaf_modules: Any = None,
            max_inputs: int | None = None) -> StripeStats:
    """Run ``model`` (in eval mode, no grad) on ``batches`` and record every channel-attention site.

    ``batches``: tensors, ``(inputs, targets)`` pairs or dicts with ``"x"``; wrap it in
    ``tqdm(batches)`` for a progress bar. ``max_inputs`` stops after that many inputs.
    ``model`` is not changed (its train/eval flags are restored). Raises :class:`NoSitesError` when
    the model has no input-dependent channel attention (``x * sigmoid(F(GAP(x)))``).
    """
    gm = trace(model, leaf_modules)
    sites = find_attention(gm)
    if not sites:
        raise NoSitesError(
            f"no input-dependent channel attention found in {type(model).__name__}: looked for "
            "x * sigmoid/hardsigmoid(F(global_pool(x))) with a small network F (SE, ECA, ...). ASR blocks "
            "(fed by psi) are constant already; an untraced custom module can be traced by leaf_modules=."
        )
    names = [n for s in sites for n in (s.gate, s.pool)]
    probe = _probe(gm, names)
    values: list[list[torch.Tensor]] = [[] for _ in sites]
    pooled: list[list[torch.Tensor]] = [[] for _ in sites]
    seen = 0
    with preserved_training_modes(model):
        model.eval()
        with torch.no_grad():
            for batch in batches:
                inputs = batch_inputs(batch)
                outs = probe(*inputs)
                n = inputs[0].shape[0]
                for i, _ in enumerate(sites):
                    values[i].append(outs[2 * i].detach().reshape(n, -1).float().cpu())
                    pooled[i].append(outs[2 * i + 1].detach().reshape(n, -1).float().cpu())
                seen += n
                if max_inputs is not None and seen >= max_inputs:
                    break
    if seen == 0:
        raise InvalidOptionError("collect got no batches: pass an iterable of input tensors or (inputs, targets) pairs")
    stats = []
    calls: dict[str, int] = {}
    for site, v, p in zip(sites, values, pooled):
        name = site.module or site.mul
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:  # one attention module called at several places: "se", "se#2", ...
            name = f"{name}#{calls[name]}"
        v_all, p_all = torch.cat(v)[:max_inputs], torch.cat(p)[:max_inputs]
        if v_all.shape[1] != p_all.shape[1]:
            raise AttentionNetworkError(f"attention at {site.module or site.mul}: {v_all.shape[1]} values per input "
                                        f"but {p_all.shape[1]} pooled channels; is it a channel attention?")
        stats.append(SiteStats(site=name, mul=site.mul, gate=site.gate, pool=site.pool,
                               feature=site.feature, channel_pos=site.channel_pos, activation=site.activation,
                               values=v_all, pooled=p_all))
    return StripeStats(stats)

__all__ = [
    "FROZEN_PREFIX", "PooledAttention", "SiteStats", "StripeStats", "collect", "find_attention",
    "plain_attention", "values_over_checkpoints",
]

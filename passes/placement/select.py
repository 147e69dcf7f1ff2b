"""Choosing sites by name or predicate, or by placement rule: ``GraphModule -> list[Site]`` (nothing is changed).

``sites=`` names nodes or modules (or is a predicate on :class:`~.locate.Site`) among every node a scale
could follow; otherwise the named rule of :data:`~.rules.PLACEMENT_RULES` finds them. ``exclude=`` is
taken away last. Refuses names that match no candidate and unknown rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx

from asr_fx.errors import InvalidOptionError, UnknownSiteError

from .locate import Site, site_at
from .rules import placement_rule, rule_names

SiteSelector = Sequence[str] | Callable[[Site], bool] | None


def _candidate_sites(gm: fx.GraphModule) -> list[Site]:
    """Every node a scale could follow: calls of conv/norm/linear modules, multi-head attention outputs."""
    return [s for s in (site_at(gm, node, "explicit") for node in gm.graph.nodes) if s is not None]


def _matches(site: Site, selector: Sequence[str] | Callable[[Site], bool]) -> bool:
    if callable(selector):
        return bool(selector(site))
    return site.node in selector or site.module in selector


def select_sites(gm: fx.GraphModule, rule: str, sites: SiteSelector, exclude: SiteSelector) -> list[Site]:
    """The sites named by ``sites`` (names or a predicate), else those of placement rule ``rule``; less ``exclude``."""
    if sites is not None:
        candidates = _candidate_sites(gm)
        chosen = [s for s in candidates if _matches(s, sites)]
        if not callable(sites):
            known = {n for s in candidates for n in (s.node, s.module)}
            missing = [name for name in sites if name not in known]
            if missing:
                raise UnknownSiteError(
                    f"sites={missing} name no conv/norm/linear call in the traced graph; "
                    f"candidates include {[s.module or s.node for s in candidates[:8]]}"
                )
    else:
        found = placement_rule(rule)
        if found is None:
            raise InvalidOptionError(f"unknown rule {rule!r}; choose one of {rule_names()}")
        chosen = found.find(gm)
    if exclude is not None:
        chosen = [s for s in chosen if not _matches(s, exclude)]
    return chosen

"""Placement: a traced GraphModule in, a list of :class:`.locate.Site` out (nothing is changed).
The placement rules (``residual``, ``norm-act``, ``transformer``, ``neck``, ...) are registered once
in :data:`.rules.PLACEMENT_RULES`; what a site may be (a layer whose output can take a scale) is the
layer registry's answer (:mod:`asr_fx.passes.layers`)."""

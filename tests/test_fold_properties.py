"""Issue 5, property-based: on random graphs of conv/BN/linear/ReLU/GELU/pool/add/concat/shared-module
calls with constant per-channel scales at random places (positive and negative, parameters, buffers
or computed from parameters as ASR does), ``fuse`` is equivalent to its input and never leaves more
parameters. 200 examples by default; ``-m slow`` runs 2,000."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FUSE_RTOL, n_params, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asr_fx

KINDS = ["conv", "bn", "linear", "relu", "gelu", "pool", "add", "cat", "shared", "scale", "scale", "scale"]


@st.composite
def programs(draw) -> dict:
    """A random straight-line program over NCHW values (4x4 spatial), as plain data."""
    channels = [draw(st.integers(1, 4))]
    ops: list[tuple] = []
    convs: list[int] = []
    for _ in range(draw(st.integers(1, 9))):
        kind = draw(st.sampled_from(KINDS))
        src = draw(st.one_of(st.just(len(channels) - 1), st.integers(0, len(channels) - 1)))  # mostly a chain
        c = channels[src]
        if kind == "shared":
            same = [i for i in convs if ops[i][2] == c]
            if not same:
                kind = "conv"
            else:
                ops.append(("shared", src, draw(st.sampled_from(same))))
                channels.append(ops[ops[-1][2]][3])
                continue
        if kind == "conv":
            out = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and out % g == 0]))
            convs.append(len(ops))
            ops.append(("conv", src, c, out, groups, draw(st.booleans())))
            channels.append(out)
        elif kind == "linear":  # a pointwise linear over channels-last, as transformer/ConvNeXt blocks do
            out = draw(st.integers(1, 4))
            ops.append(("linear", src, c, out))
            channels.append(out)
        elif kind in ("add", "cat"):
            other = draw(st.integers(0, len(channels) - 1))
            if kind == "add" and channels[other] != c:
                continue
            ops.append((kind, src, other))
            channels.append(c + channels[other] if kind == "cat" else c)
        elif kind == "scale":
            ops.append(("scale", src, c, draw(st.sampled_from(["param", "buffer", "computed"])),
                        draw(st.sampled_from(["positive", "negative", "mixed"])), draw(st.booleans())))
            channels.append(c)
        elif kind == "pool":
            ops.append(("pool", src, draw(st.sampled_from(["max", "avg"]))))
            channels.append(c)
        else:
            ops.append((kind, src, c))
            channels.append(c)
    head = draw(st.booleans())
    outputs = set(draw(st.lists(st.integers(0, len(channels) - 1), max_size=1)))
    outputs = sorted(outputs if head else outputs | {len(channels) - 1})
    return {"channels": channels, "ops": ops, "outputs": outputs, "head": head,
            "seed": draw(st.integers(0, 2**16)), "shapes": draw(st.booleans())}


class Program(nn.Module):
    """Runs a program from :func:`programs`; torch.fx unrolls it into a graph."""

    def __init__(self, program: dict) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(program["seed"])
        self.program = program
        self.layers = nn.ModuleDict()
        for i, op in enumerate(program["ops"]):
            kind = op[0]
            if kind == "conv":
                self.layers[str(i)] = nn.Conv2d(op[2], op[3], 3, padding=1, groups=op[4], bias=op[5])
            elif kind == "linear":
                self.layers[str(i)] = nn.Linear(op[2], op[3])
            elif kind == "bn":
                bn = nn.BatchNorm2d(op[2])
                with torch.no_grad():
                    bn.running_mean.uniform_(-1, 1, generator=g)
                    bn.running_var.uniform_(0.5, 2, generator=g)
                    bn.weight.uniform_(-2, 2, generator=g)
                    bn.bias.uniform_(-1, 1, generator=g)
                self.layers[str(i)] = bn
            elif kind == "relu":
                self.layers[str(i)] = nn.ReLU()
            elif kind == "gelu":
                self.layers[str(i)] = nn.GELU()
            elif kind == "pool":
                self.layers[str(i)] = nn.MaxPool2d(3, 1, 1) if op[2] == "max" else nn.AvgPool2d(3, 1, 1)
            elif kind == "scale":
                _, _, c, storage, sign, batch_dim = op
                magnitude = torch.rand(c, generator=g) * 1.5 + 0.25
                signs = {"positive": 1.0, "negative": -1.0}.get(sign)
                value = magnitude * (signs if signs else torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0))
                value = value.reshape((1, c, 1, 1) if batch_dim else (c, 1, 1))
                if storage == "param":
                    self.register_parameter(f"s{i}", nn.Parameter(value))
                elif storage == "buffer":
                    self.register_buffer(f"s{i}", value)
                else:  # ASR-like: a constant computed from a parameter, folded by constant folding
                    self.register_parameter(f"psi{i}", nn.Parameter(value))
        if program["head"]:
            self.head = nn.Linear(program["channels"][-1] * 16, 3)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.5)

    def forward(self, x):
        values = [x]
        for i, op in enumerate(self.program["ops"]):
            kind, src = op[0], values[op[1]]
            if kind == "shared":
                values.append(self.layers[str(op[2])](src))
            elif kind == "add":
                values.append(src + values[op[2]])
            elif kind == "cat":
                values.append(torch.cat([src, values[op[2]]], 1))
            elif kind == "linear":
                values.append(self.layers[str(i)](src.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif kind == "scale":
                if op[3] == "computed":
                    psi = getattr(self, f"psi{i}")
                    values.append(src * (torch.tanh(psi) * 2))
                else:
                    values.append(src * getattr(self, f"s{i}"))
            else:
                values.append(self.layers[str(i)](src))
        outs = [values[i] for i in self.program["outputs"]]
        if self.program["head"]:
            outs.append(self.head(torch.flatten(values[-1], 1)))
        return tuple(outs)


def check_fuse_is_equivalent(program: dict) -> None:
    model = Program(program).eval()  # fp32, where DESIGN.md's tolerance is defined
    x = torch.randn(2, program["channels"][0], 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        refs = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,) if program["shapes"] else None)
    with torch.no_grad():
        outs = fused(x)
    for ref, out in zip(refs, outs, strict=True):
        assert ref.shape == out.shape
        assert rel_err(ref, out) <= FUSE_RTOL, (rel_err(ref, out), asr_fx.fusion_report(fused).table())
    assert n_params(fused) <= n_params(model)
    report = asr_fx.fusion_report(fused)
    left = sum(1 for n in fused.graph.nodes
               if n.target in (torch.mul, "mul") or getattr(n.target, "__name__", "") == "mul")
    assert left == sum(not r.folded for r in report.records)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@settings(max_examples=200, **_SETTINGS)
@given(programs())
def test_fuse_is_equivalent_on_random_graphs(program):
    check_fuse_is_equivalent(program)


@pytest.mark.slow
@settings(max_examples=2000, **_SETTINGS)
@given(programs())
def test_fuse_is_equivalent_on_random_graphs_long(program):
    check_fuse_is_equivalent(program)


def test_random_graphs_fold_most_scales():
    """The property above is not vacuous: scales after a BN, after an add with another user and after a
    concat feeding a flatten+linear head all fold (into the BN, the next conv, the head)."""
    folded = total = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        c = int(torch.randint(2, 5, (1,), generator=g))
        ops = [("conv", 0, c, c, 1, True), ("bn", 1, c), ("scale", 2, c, "computed", "mixed", True), ("relu", 3, c),
               ("add", 4, 0), ("scale", 5, c, "param", "positive", False), ("relu", 6, c),
               ("conv", 7, c, c, 1, False), ("cat", 8, 5), ("scale", 9, 2 * c, "buffer", "negative", True)]
        program = {"channels": [c] * 9 + [2 * c, 2 * c], "ops": ops, "outputs": [], "head": True, "seed": seed,
                   "shapes": True}
        check_fuse_is_equivalent(program)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = asr_fx.fuse(Program(program).eval(), example_inputs=(torch.randn(1, c, 4, 4),))
        records = asr_fx.fusion_report(fused).records
        folded += sum(r.folded for r in records)
        total += len(records)
    assert total == 30 and folded == 30

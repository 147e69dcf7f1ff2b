"""Partial capture instruments parts called with keyword tensors (a transformer block called with ``mask=``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FUSE_RTOL, perturb_asr, rel_err
from torch import nn

import asr_fx
from asr_fx.config import asr_config
from asr_fx.partial_capture import part_probe


def _through(blocks: nn.ModuleList, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Each block in turn, with a data-dependent early exit: the caller's whole forward does not trace."""
    for block in blocks:
        x = block(x, **kwargs)
        if bool((x.abs() > 1e6).any()):
            break
    return x


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x, cache=None, mask=None):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask
        x = x + self.proj(scores.softmax(-1) @ v)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class _Encoder(nn.Module):
    """Its own forward cannot be traced (a data-dependent early exit); its blocks get the mask by keyword."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(2))

    def forward(self, tokens, lengths):
        x = self.embed(tokens)
        positions = torch.arange(tokens.shape[1])
        mask = torch.where(positions[None, :] < lengths[:, None], 0.0, -1e4)[:, None, :]
        return _through(self.blocks, x, mask=mask)


def test_blocks_called_with_a_keyword_mask_are_instrumented():
    torch.manual_seed(0)
    model = _Encoder().eval()
    inputs = (torch.randn(2, 6, 4), torch.tensor([6, 3]))
    instrumented = asr_fx.instrument(model, example_inputs=inputs)
    config = asr_fx.get_config(instrumented)
    assert config["parts"] == ["blocks.0", "blocks.1"]
    assert {s["node"] for s in config["sites"]} == {f"blocks.{i}/{n}" for i in range(2) for n in ("proj", "fc2")}
    instrumented.eval()
    other = (torch.randn(3, 6, 4), torch.tensor([2, 6, 4]))  # another mask: the parts take it as an input
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=inputs)
    with torch.no_grad():
        want = instrumented(*other)
        assert ((fused(*other) - want).abs().max() / want.abs().max()).item() <= 1e-5
        for block in instrumented.modules():
            if isinstance(block, asr_fx.ASR):
                block.attention_value = lambda b=block: torch.ones(b.broadcast_shape)
        torch.testing.assert_close(instrumented(*other), model(*other), rtol=1e-5, atol=1e-6)
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


class _IndexedBlock(nn.Module):
    """Takes token positions (integers) and a boolean key mask by keyword."""

    def __init__(self, dim: int, length: int = 8) -> None:
        super().__init__()
        self.pos = nn.Embedding(length, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x, positions=None, keep=None):
        x = x + self.pos(positions)
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, :], -1e4)
        x = x + self.proj(scores.softmax(-1) @ v)
        return x + self.fc2(torch.relu(self.fc1(x)))


class _IndexedEncoder(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(_IndexedBlock(dim) for _ in range(2))

    def forward(self, tokens, lengths):
        x = self.embed(tokens)
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        keep = positions < lengths[:, None]
        return _through(self.blocks, x, positions=positions, keep=keep)


def test_blocks_called_with_integer_and_boolean_keyword_tensors_are_instrumented_and_probed_in_kind():
    torch.manual_seed(0)
    model = _IndexedEncoder().eval()
    inputs = (torch.randn(2, 6, 4), torch.tensor([6, 3]))
    instrumented = asr_fx.instrument(model, example_inputs=inputs)
    config = asr_fx.get_config(instrumented)
    assert config["parts"] == ["blocks.0", "blocks.1"]
    assert config["part_input_kinds"]["blocks.0"] == [None, {"dtype": "int64", "low": 0, "high": 5},
                                                      {"dtype": "bool", "low": 0, "high": 1}]
    probe = part_probe(asr_config(instrumented), "blocks.0", None)
    assert [t.dtype for t in probe] == [torch.float32, torch.int64, torch.bool]
    assert probe[1].min() >= 0 and probe[1].max() <= 5
    perturb_asr(instrumented)
    instrumented.eval()
    other = (torch.randn(3, 6, 4), torch.tensor([2, 6, 4]))
    for given in (inputs, None):  # None: each part is checked on its own probe (ids in range, a boolean mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # None: the whole model has no probe (it takes lengths): the parts do
            fused = asr_fx.fuse(instrumented, strict=True, example_inputs=given)
        with torch.no_grad():
            assert rel_err(instrumented(*other), fused(*other)) <= FUSE_RTOL
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


class _FlagBlock(_Block):
    """Takes the flags a library hands every layer through ``**kwargs`` (transformers 5's
    ``output_hidden_states=``, ``output_attentions=``): they never reach the computation here."""

    def forward(self, x, mask=None, **kwargs):
        return super().forward(x, mask=mask)


class _FlagEncoder(_Encoder):
    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.blocks = nn.ModuleList(_FlagBlock(dim) for _ in range(2))

    def forward(self, tokens, lengths):
        x = self.embed(tokens)
        return _through(self.blocks, x, output_hidden_states=True, output_attentions=False)


def test_blocks_given_flags_through_kwargs_are_instrumented_in_their_own_class():
    torch.manual_seed(0)
    model = _FlagEncoder().eval()
    inputs = (torch.randn(2, 6, 4), torch.tensor([6, 3]))
    instrumented = asr_fx.instrument(model, example_inputs=inputs)
    config = asr_fx.get_config(instrumented)
    assert config["parts"] == ["blocks.0", "blocks.1"] and len(config["sites"]) == 4
    assert all(type(b) is _FlagBlock for b in instrumented.blocks)  # the module form: its own forward, any flags
    perturb_asr(instrumented)
    instrumented.eval()
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=inputs)
    with torch.no_grad():
        want = instrumented(*inputs)
        assert rel_err(fused(*inputs), want) <= FUSE_RTOL
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


class _ParallelBlock(nn.Module):
    """Its site is the sum of two conv-BN branches (functional code): only the graph form holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, **kwargs):
        return torch.relu(self.b1(self.c1(x)) + self.b2(self.c2(x)))


class _ParallelEncoder(nn.Module):
    def __init__(self, flags: bool) -> None:
        super().__init__()
        self.flags = flags
        self.blocks = nn.ModuleList(_ParallelBlock() for _ in range(2))

    def forward(self, x):
        flags = {"output_hidden_states": True} if self.flags else {}
        return _through(self.blocks, x, **flags)


def test_a_part_given_flags_through_kwargs_is_refused_where_only_its_graph_form_would_fit():
    x = (torch.randn(2, 4, 6, 6),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each block alone: "instrument returns a GraphModule"
        plain = asr_fx.instrument(_ParallelEncoder(flags=False).eval(), example_inputs=x)
        assert asr_fx.get_config(plain)["parts"] == ["blocks.0", "blocks.1"]  # the graph form takes no flags
        with pytest.raises(asr_fx.TraceError, match=r"blocks\.0: its forward takes output_hidden_states through "
                                                     r"\*\*kwargs, which only the module form keeps"):
            asr_fx.instrument(_ParallelEncoder(flags=True).eval(), example_inputs=x)

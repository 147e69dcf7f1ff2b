"""Hugging Face text transformers from tiny configs: captured whole, ViT-style (transformer rule) sites."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, perturb_asr, rel_err

import asr_fx

transformers = pytest.importorskip("transformers")


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def test_a_two_layer_bert_takes_attention_and_mlp_sites_and_fuses():
    torch.manual_seed(0)
    model = _bert().eval()
    ids = torch.randint(0, 100, (2, 12))
    instrumented = asr_fx.instrument(model, example_inputs=(ids,))
    sites = {s["module"]: s["rule"] for s in asr_fx.get_config(instrumented)["sites"]}
    assert sites == {f"bert.encoder.layer.{i}.{name}.dense": "transformer" for i in range(2)
                     for name in ("attention.output", "output")}
    instrumented.train()
    out = instrumented(torch.randint(0, 100, (2, 12))).logits
    out.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in instrumented.named_parameters() if ".asr." in n or n.startswith("asr."))
    instrumented.eval()
    other = torch.randint(0, 100, (3, 7))  # another batch and length: sizes stay symbolic
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(ids,))
    with torch.no_grad():
        assert rel_err(instrumented(other).logits, fused(other).logits) <= FUSE_RTOL
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


def _roberta():
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                        pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def _ids_and_mask(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding: the mask changes the first sequence's output
    return ids, mask


@pytest.mark.parametrize(("build", "prefix"), [(_bert, "bert"), (_roberta, "roberta")])
def test_an_encoder_captured_with_its_attention_mask_takes_sites_in_every_layer(build, prefix):
    """The extended mask is built to the embeddings' sizes: it is a side input of every layer's attention branch."""
    torch.manual_seed(0)
    model = build().eval()
    instrumented = asr_fx.instrument(model, example_inputs=_ids_and_mask(2, 12, 0))
    sites = {s["module"] for s in asr_fx.get_config(instrumented)["sites"]}
    assert sites == {f"{prefix}.encoder.layer.{i}.{name}.dense" for i in range(2) for name in ("attention.output",
                                                                                                 "output")}
    perturb_asr(instrumented)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=_ids_and_mask(2, 12, 0))
    ids, mask = _ids_and_mask(3, 7, 1)
    with torch.no_grad():
        ref = instrumented(ids, attention_mask=mask).logits
        assert rel_err(ref, fused(ids, attention_mask=mask).logits) <= FUSE_RTOL
        assert rel_err(ref, instrumented(ids).logits) > 1e-4  # the mask is used
    assert asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)


def test_a_t5_encoder_traces_through_its_sdpa_attention():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    instrumented = asr_fx.instrument(model, example_inputs=(ids,))
    # the attention's dropout rate is picked by mode inside it: bound to the mode, the attention is traced through
    assert [s["module"] for s in asr_fx.get_config(instrumented)["sites"]] == [
        f"encoder.block.{i}.layer.{j}" for i in range(2) for j in ("0.SelfAttention.o", "1.DenseReluDense.wo")]
    perturb_asr(instrumented)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(ids,))
    other = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        ref = instrumented(other).last_hidden_state
        assert rel_err(ref, fused(other).last_hidden_state) <= FUSE_RTOL


def test_a_gpt2_takes_sites_in_its_transposed_linear_projections_and_fuses():
    """GPT-2's projections are transformers' Conv1D (x @ W + b): kept as one call, their outputs are sites."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    ids, _ = _ids_and_mask(2, 12, 0)
    instrumented = asr_fx.instrument(model, example_inputs=(ids,))
    assert [s["module"] for s in asr_fx.get_config(instrumented)["sites"]] == [
        f"h.{i}.{name}.c_proj" for i in range(2) for name in ("attn", "mlp")]
    perturb_asr(instrumented)
    fused = asr_fx.fuse(instrumented, strict=True, example_inputs=(ids,))
    other, _ = _ids_and_mask(3, 7, 1)
    with torch.no_grad():
        ref = instrumented(other).last_hidden_state
        assert rel_err(ref, fused(other).last_hidden_state) <= FUSE_RTOL
    assert type(fused) is type(model) and asr_fx.count_parameters(fused) == asr_fx.count_parameters(model)

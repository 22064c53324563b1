"""reasonmaxxer.models.forward: the policy's completion statistics through the fused head vs full logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonmaxxer.models import forward
from reasonmaxxer.models.forward import (
    completion_hidden,
    completion_logits,
    final_hidden,
    linear_head,
    policy_token_stats,
)
from reasonmaxxer.stages.scoring import score_batch
from reasonmaxxer.utils.sequences import pack_batch


def _peft_model(tiny_model_dir: Path, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a peakier head, so the KL and the top-k are far from uniform
        base.get_output_embeddings().weight.mul_(8.0)
    model = get_peft_model(base, LoraConfig(target_modules=target_modules, r=4, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def _batch(model, top_k=5):
    """Rows of different lengths: left-padded prompts, right-padded completions, a one-token completion."""
    vocab = model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (4, 2, 6)]
    completions = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (7, 1, 4)]
    batch = pack_batch(prompts, completions, pad_id=0)
    with model.disable_adapter():
        scores = score_batch(model.get_base_model(), batch, top_k=top_k, chunk_size=3, entropy_temperature=1.0)
    batch["topk_ids"], batch["topk_logp"] = scores["topk_ids"], scores["topk_logp"]
    return batch


def test_final_hidden_through_the_peft_model_is_what_the_head_reads(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    batch = _batch(model)
    hidden = final_hidden(model, batch)
    torch.testing.assert_close(hidden, completion_hidden(model.get_base_model(), batch))
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(hidden), completion_logits(model, batch), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():  # the adapter is active in the pass above, and off here
        base_hidden = final_hidden(model, batch)
    assert (hidden - base_hidden).abs().max() > 1e-3


def test_linear_head_takes_only_a_plain_whole_head_apart(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    head = linear_head(model.get_base_model())
    assert head.weight is model.get_output_embeddings().weight and head.bias is None and head.softcap is None
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert linear_head(model.get_base_model()).softcap == 30.0
    lora_on_head = _peft_model(tiny_model_dir, target_modules=["q_proj", "lm_head"])
    assert linear_head(lora_on_head.get_base_model()) is None  # LoRA wraps the head: full logits instead


def _stats_and_lora_grads(model, batch, anchor, fused: bool, monkeypatch):
    if not fused:
        monkeypatch.setattr(forward, "linear_head", lambda _model: None)
    model.zero_grad()
    stats = policy_token_stats(model, model, batch, kl_anchor=anchor, entropy_temperature=0.7)
    monkeypatch.undo()
    mask = batch["completion_mask"].float()
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view_as(mask)
    ((stats.logp * weights + 0.5 * stats.kl) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return stats, grads


@pytest.mark.parametrize("anchor", ["cached", "exact"])
def test_fused_head_matches_full_logits_in_values_and_lora_gradients(tiny_model_dir, anchor, monkeypatch):
    model = _peft_model(tiny_model_dir)
    model.train()
    batch = _batch(model)
    fused, fused_grads = _stats_and_lora_grads(model, batch, anchor, True, monkeypatch)
    full, full_grads = _stats_and_lora_grads(model, batch, anchor, False, monkeypatch)
    mask = batch["completion_mask"].bool()
    assert (full.kl[mask] > 1e-3).all()  # the adapter really moved the policy
    for key in ("logp", "kl", "entropy"):
        torch.testing.assert_close(getattr(fused, key)[mask], getattr(full, key)[mask], atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == full_grads.keys() and any("lora_A" in n for n in fused_grads)
    for name, grad in fused_grads.items():
        assert grad.abs().max() > 0, name  # every LoRA weight gets gradient through the decoder
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_policy_token_stats_rejects_an_unknown_anchor(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="kl_anchor"):
        policy_token_stats(model, model, _batch(model), kl_anchor="nearby")

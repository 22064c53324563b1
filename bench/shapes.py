"""Randomly initialised models of real architectures, for the benchmarks: no hub access needed.

bench/gpu.py builds its Qwen2.5 shapes here, and bench/step.py takes ``--model qwen2.5-0.5b``
(or ``qwen2.5-1.5b``) to time a step at a real vocabulary without the weights.
"""

from __future__ import annotations

from typing import Any

import torch

QWEN_VOCAB = 151_936
# Qwen2.5 sizes (their config.json): hidden, layers, heads, kv heads, intermediate; vocab 151,936, tied.
QWEN = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
    # Qwen2.5-7B's layer, attention and head shapes with 8 of its 28 decoder layers (the vocabulary and the
    # LM head, what the fused head is about, whole): a step's time and memory per layer scale from it.
    "qwen2.5-7b-8of28": dict(hidden_size=3584, num_hidden_layers=8, num_attention_heads=28, num_key_value_heads=4,
                             intermediate_size=18944),
}


def random_qwen(shape: dict[str, int], *, vocab: int = QWEN_VOCAB, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16, sharpen: float = 1.0) -> tuple[Any, Any]:
    """A Qwen2 model of ``shape`` (seeded random init, tied head) on ``device`` in ``dtype``, and a tokenizer.

    The tokenizer is the tests' tiny one (ids below 320: pad, EOS and the chat template are
    what is used). ``sharpen`` scales the final norm, so the logits and hence the sampling
    distribution are less flat than a fresh init's (rollouts sample from a few hundred
    tokens, not all).
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    from reasonmaxxer.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=32_768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    return model.eval(), tokenizer

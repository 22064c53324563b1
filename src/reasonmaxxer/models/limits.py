"""What a run may ask of a model, checked before any work: its context, its heads, its precision.

Each check raises a one-line :class:`~reasonmaxxer.errors.ConfigError` that names the
config key and the model's limit, so a mistake stops the run before hours of rollouts
rather than in the middle of them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

# Rope scalings that stretch the positions a model was trained on by their factor.
_EXTENDING_ROPE = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(config: Any) -> int | None:
    """The positions the model can attend over, or None when its config does not say.

    ``max_position_embeddings``, or the rope scaling's reach when that is longer: the
    original context times the factor (``rope_parameters``, or ``rope_scaling`` in
    older configs) for the scalings that extend it.
    """
    text = _text_config(config)
    positions = getattr(text, "max_position_embeddings", None)
    if positions is None:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if kind in _EXTENDING_ROPE and factor:
        original = rope.get("original_max_position_embeddings", positions)
        return max(int(positions), int(original * factor))
    return int(positions)


def check_context(config: Any, *, longest_prompt: int, max_new_tokens: int, model_name: str,
                  key: str = "rollout.max_new_tokens") -> None:
    """The longest prompt plus ``max_new_tokens`` fit the model's context.

    Raises:
        ConfigError naming ``key``, the positions needed and the model's context.
    """
    limit = context_length(config)
    if limit is None or longest_prompt + max_new_tokens <= limit:
        return
    room = limit - longest_prompt
    fix = f"lower {key} to at most {room}" if room > 0 else "shorten the prompts"
    raise ConfigError(
        f"{key}: {max_new_tokens} new tokens after prompts of up to {longest_prompt} tokens need "
        f"{longest_prompt + max_new_tokens} positions, more than the {limit} of {model_name} "
        f"(max_position_embeddings, rope scaling included); {fix}, or use a model with a longer context")


def check_tensor_parallel(config: Any, *, size: int, model_name: str,
                          key: str = "rollout.vllm_tensor_parallel_size") -> None:
    """``size`` splits the model's heads as vLLM does: it divides the attention heads, and it divides
    the key/value heads or is a multiple of them (each is then replicated over size / kv GPUs)."""
    if size <= 1:
        return
    text = _text_config(config)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads is not None and heads % size:
        raise ConfigError(f"{key}: {size} does not divide the {heads} attention heads of {model_name}; "
                          f"use a divisor of {heads}")
    if kv_heads is not None and kv_heads % size and size % kv_heads:
        raise ConfigError(f"{key}: {size} neither divides the {kv_heads} key/value heads of {model_name} nor is "
                          f"a multiple of them")


def check_precision(dtype: torch.dtype, device: torch.device, *, key: str = "model.dtype") -> None:
    """bfloat16 on a CUDA device that has it (compute capability 8.0 and up)."""
    if dtype != torch.bfloat16 or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:  # before Ampere, bf16 runs emulated (torch.cuda.is_bf16_supported() says True then)
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{key}: bfloat16 on {name} (compute capability {major}.{minor}), which has no bf16; "
                          "use float32 (or float16, which may overflow)")

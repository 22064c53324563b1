"""Sampling completions from a causal LM: prompts, the `fast` KV-cache loop, `model.generate`, vLLM.

Shapes: B rows being decoded (prompts x samples), V vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import torch

from ..config import DataConfig, RolloutConfig
from ..data.problem import Problem
from ..data.prompts import user_message
from ..errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_prompt_format(tokenizer: Any, data: DataConfig, *, log: bool = True) -> Literal["chat", "plain"]:
    """``data.prompt_format`` with ``auto`` decided by whether the tokenizer has a chat template.

    ``log`` says the outcome in one INFO line (call it so once per run).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if data.prompt_format == "chat" and not has_template:
        raise ConfigError("data.prompt_format: 'chat' needs a tokenizer with a chat template, and this model's "
                          "has none; use 'plain' (or 'auto') for a base model")
    chosen = "plain" if data.prompt_format == "plain" or not has_template else "chat"
    if log:
        reason = "data.prompt_format"
        if data.prompt_format == "auto":
            reason = f"auto: the tokenizer has {'a' if has_template else 'no'} chat template"
        logger.info("prompts: %s format (%s)", chosen, reason)
    return chosen


def chat_prompt_ids(tokenizer: Any, problem: Problem, data: DataConfig) -> list[int]:
    """The problem as the model's chat template renders it, ready for the assistant turn."""
    messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    messages.append({"role": "user", "content": user_message(data.user_template(), problem.prompt)})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_prompt_text(problem: Problem, data: DataConfig) -> str:
    """The bare-text prompt of a base model: the system prompt (if any), a blank line, the user message."""
    user = user_message(data.user_template(), problem.prompt)
    return f"{data.system_prompt}\n\n{user}" if data.system_prompt else user


def plain_prompt_ids(tokenizer: Any, problem: Problem, data: DataConfig) -> list[int]:
    """The plain prompt tokenized with the tokenizer's own special tokens (a BOS where the model uses one)."""
    return tokenizer(plain_prompt_text(problem, data), add_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer: Any, problem: Problem, data: DataConfig, prompt_format: Literal["chat", "plain"]) -> list[int]:
    """The token ids the model is given for ``problem``, in a resolved format (see resolve_prompt_format)."""
    if prompt_format == "chat":
        return chat_prompt_ids(tokenizer, problem, data)
    return plain_prompt_ids(tokenizer, problem, data)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a completion (generation config and tokenizer)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Keep a generated row up to and including its first EOS; say why it ended."""
    out: list[int] = []
    for tok in tokens:
        out.append(int(tok))
        if tok in eos_ids:
            return out, "eos"
    return out, "length"


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None,
                do_sample: bool = True, candidates: int = 256) -> torch.Tensor:
    """One token per row: greedy, or nucleus sampling at a temperature.

    The nucleus is searched among the ``candidates`` most likely tokens first (a top-k
    instead of a full-vocabulary sort); rows whose candidates hold less than ``top_p`` of
    the mass fall back to the full sort, so the result is exact either way.

    Args:
        logits: (n, V) next-token logits.

    Returns:
        (n,) sampled token ids.
    """
    if not do_sample:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(z, -1), 1, generator=generator).squeeze(-1)
    lse = torch.logsumexp(z, -1, keepdim=True)
    vals, idx = z.topk(min(candidates, z.shape[-1]), dim=-1)  # sorted, descending
    probs = torch.exp(vals - lse)
    short = probs.sum(-1) < top_p
    if short.any():  # the candidates miss part of the nucleus: sort those rows fully
        full_vals, full_idx = z[short].sort(dim=-1, descending=True)
        rows = torch.exp(full_vals - lse[short])
        picked = _sample_nucleus(rows, top_p, generator)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        out[short] = full_idx.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
        if (~short).any():
            keep = _sample_nucleus(probs[~short], top_p, generator)
            out[~short] = idx[~short].gather(-1, keep.unsqueeze(-1)).squeeze(-1)
        return out
    picked = _sample_nucleus(probs, top_p, generator)
    return idx.gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def _sample_nucleus(sorted_probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample a column of descending probabilities, keeping the smallest prefix with mass >= top_p."""
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    return torch.multinomial(kept, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def fast_generate(
    model: Any,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    eos_ids: set[int],
    pad_id: int,
    *,
    seed: int,
    do_sample: bool = True,
) -> list[list[tuple[list[int], str]]]:
    """cfg.num_samples completions per prompt with a KV-cache loop that drops finished rows.

    ``model.generate`` keeps computing every row until the longest one ends; here a row
    leaves the batch (and the cache) at its EOS, so a step costs only the live rows. The
    prompts are prefilled once each and the cache is repeated for the samples.

    Returns, per prompt, a list of (completion_ids, finish_reason).
    """
    device = next(model.parameters()).device
    n = cfg.num_samples
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    if n > 1:
        cache.batch_repeat_interleave(n)
    attention_mask = attention_mask.repeat_interleave(n, dim=0)
    next_pos = position_ids[:, -1].repeat_interleave(n, dim=0) + 1
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(eos_ids), device=device)

    rows = len(prompts) * n
    tokens: list[list[int]] = [[] for _ in range(rows)]
    finish = ["length"] * rows
    live = torch.arange(rows, device=device)  # original row of each batch row
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                          do_sample=do_sample)
        for r, t in zip(live.tolist(), nxt.tolist()):
            tokens[r].append(t)
        done = torch.isin(nxt, eos)
        for r in live[done].tolist():
            finish[r] = "eos"
        if step == cfg.max_new_tokens - 1:
            break
        keep = ~done
        if not keep.any():
            break
        if not keep.all():
            kept = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            live, nxt, attention_mask, next_pos = live[kept], nxt[kept], attention_mask[kept], next_pos[kept]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=-1)
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=attention_mask, position_ids=next_pos.unsqueeze(-1),
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return [[(tokens[i * n + j], finish[i * n + j]) for j in range(n)] for i in range(len(prompts))]


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    eos_ids: set[int],
    *,
    seed: int,
    do_sample: bool = True,
) -> list[list[tuple[list[int], str]]]:
    """cfg.num_samples completions for each prompt: ``fast_generate``, one ``model.generate`` call,
    or a :class:`~reasonmaxxer.stages.vllm_backend.VllmSampler` in place of the model.

    With ``do_sample=False`` the completion is greedy (cfg.num_samples must then be 1).

    Returns, per prompt, a list of (completion_ids, finish_reason).
    """
    if cfg.backend == "vllm":
        return model.generate(prompts, cfg, eos_ids, seed=seed, do_sample=do_sample)  # a VllmSampler
    if cfg.backend == "fast":
        return fast_generate(model, prompts, cfg, eos_ids, tokenizer.pad_token_id, seed=seed, do_sample=do_sample)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0} if do_sample \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **sampling,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_samples,
        eos_token_id=sorted(eos_ids),
        pad_token_id=pad,
    )
    generated = out[:, width:].tolist()
    n = cfg.num_samples
    return [[cut_at_eos(generated[i * n + j], eos_ids) for j in range(n)] for i in range(len(prompts))]

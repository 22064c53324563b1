"""Sampling completions from a causal LM: prompts, the `fast` KV-cache loop, `model.generate`, vLLM.

Shapes: B rows being decoded (prompts x samples), V vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, NamedTuple, Sequence

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


class NucleusCandidates(NamedTuple):
    """The ``candidates`` most likely tokens of each row, scaled by the temperature (n rows, k candidates).

    ``short`` flags the rows whose candidates hold less than top_p of the mass: their
    nucleus reaches past the candidates, and only a full sort finds it.
    """

    z: torch.Tensor  # (n, V) logits / temperature, float32
    lse: torch.Tensor  # (n, 1) log-sum-exp of z
    probs: torch.Tensor  # (n, k) probabilities of the candidates, descending
    idx: torch.Tensor  # (n, k) their token ids
    short: torch.Tensor  # (n,) bool

    def rows(self, index: torch.Tensor) -> "NucleusCandidates":
        """The same candidates for the batch rows ``index`` ((m,) long), in that order."""
        return NucleusCandidates(*(t[index] for t in self))


def nucleus_candidates(logits: torch.Tensor, *, temperature: float, top_p: float,
                       candidates: int = 256) -> NucleusCandidates:
    """Everything nucleus sampling needs from ``logits`` ((n, V)), computed without reading the device."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    vals, idx = z.topk(min(candidates, z.shape[-1]), dim=-1)  # sorted, descending
    probs = torch.exp(vals - lse)
    return NucleusCandidates(z, lse, probs, idx, probs.sum(-1) < top_p)


def sample_from_candidates(cand: NucleusCandidates, short_rows: Sequence[bool], *, top_p: float,
                           generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the nucleus; ``short_rows`` is ``cand.short`` as read to the host.

    Rows flagged short are sorted over the full vocabulary; the others sample among their
    candidates. Row indices are built on the device from the flags and their host count
    (``nonzero_static``), so this reads nothing from the device.

    Returns:
        (n,) sampled token ids.
    """
    n_short = sum(short_rows)
    if n_short == 0:
        picked = _sample_nucleus(cand.probs, top_p, generator)
        return cand.idx.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    n = len(short_rows)
    short_idx = torch.nonzero_static(cand.short, size=n_short).squeeze(-1)
    full_vals, full_idx = cand.z[short_idx].sort(dim=-1, descending=True)
    picked = _sample_nucleus(torch.exp(full_vals - cand.lse[short_idx]), top_p, generator)
    out = torch.empty(n, dtype=torch.long, device=cand.z.device)
    out[short_idx] = full_idx.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    if n_short < n:
        rest = torch.nonzero_static(~cand.short, size=n - n_short).squeeze(-1)
        keep = _sample_nucleus(cand.probs[rest], top_p, generator)
        out[rest] = cand.idx[rest].gather(-1, keep.unsqueeze(-1)).squeeze(-1)
    return out


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None,
                do_sample: bool = True, candidates: int = 256) -> torch.Tensor:
    """One token per row: greedy, or nucleus sampling at a temperature.

    The nucleus is searched among the ``candidates`` most likely tokens first (a top-k
    instead of a full-vocabulary sort); rows whose candidates hold less than ``top_p`` of
    the mass fall back to the full sort, so the result is exact either way. Nucleus
    sampling reads the (n,) fallback flags from the device once; ``fast_generate`` reads
    them together with its finished flags instead (see sample_from_candidates).

    Args:
        logits: (n, V) next-token logits.

    Returns:
        (n,) sampled token ids.
    """
    if not do_sample:
        return logits.argmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator).squeeze(-1)
    cand = nucleus_candidates(logits, temperature=temperature, top_p=top_p, candidates=candidates)
    return sample_from_candidates(cand, cand.short.tolist(), top_p=top_p, generator=generator)


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
    leaves the batch (and the cache) after its EOS, so a step costs only the live rows. The
    prompts are prefilled once each and the cache is repeated for the samples.

    The loop reads the device once per step: one small tensor holding the previous step's
    finished flags and this step's nucleus fallback flags (nothing at all when neither
    exists: greedy or top_p = 1 at the first step). Tokens stay on the device until the
    end. So a row that ends at step t is dropped at step t + 1, after taking part in one
    more forward pass whose output is discarded; the tokens sampled for the live rows are
    the ones an immediate drop would give (same rows, same generator draws).

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
    # transformers >= 5.24 calls the KV cache `cache` (output and argument); earlier 5.x, `past_key_values`.
    cache_key = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, cache_key)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    if n > 1:
        cache.batch_repeat_interleave(n)
    attention_mask = attention_mask.repeat_interleave(n, dim=0)
    next_pos = position_ids[:, -1].repeat_interleave(n, dim=0) + 1
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(eos_ids), device=device)
    nucleus = do_sample and cfg.top_p < 1.0

    rows = len(prompts) * n
    # Every sampled token, by original row; a dropped row keeps pad after its EOS, and
    # cut_at_eos stops at that EOS, so the pads never reach a completion.
    generated = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # original row of each batch row
    ended: torch.Tensor | None = None  # (len(live),) bool: the row's last token was an EOS
    for step in range(cfg.max_new_tokens):
        cand = nucleus_candidates(logits, temperature=cfg.temperature, top_p=cfg.top_p) if nucleus else None
        flags = [f for f in (ended, None if cand is None else cand.short) if f is not None]
        read = torch.stack(flags).tolist() if flags else []  # the step's one read of the device
        short_rows = read[-1] if cand is not None else []
        if ended is not None:
            ended_rows = read[0]
            n_live = len(ended_rows) - sum(ended_rows)
            if n_live == 0:
                break
            if n_live < len(ended_rows):
                kept = torch.nonzero_static(~ended, size=n_live).squeeze(-1)
                cache.batch_select_indices(kept)
                live, logits, attention_mask, next_pos = live[kept], logits[kept], attention_mask[kept], next_pos[kept]
                if cand is not None:
                    cand = cand.rows(kept)
                    short_rows = [s for s, e in zip(short_rows, ended_rows) if not e]
        if cand is not None:
            nxt = sample_from_candidates(cand, short_rows, top_p=cfg.top_p, generator=generator)
        else:
            nxt = sample_next(logits, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                              do_sample=do_sample)
        generated[live, step] = nxt
        ended = torch.isin(nxt, eos)
        if step == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=-1)
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=attention_mask, position_ids=next_pos.unsqueeze(-1),
                    use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    completions = [cut_at_eos(row, eos_ids) for row in generated.tolist()]  # the call's one read of the tokens
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]


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

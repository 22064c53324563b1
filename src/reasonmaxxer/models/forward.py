"""Forward passes that return only what predicts the completion tokens.

A packed batch (:func:`reasonmaxxer.utils.sequences.pack_batch`) left-pads prompts so
every completion starts at column P; column P + j - 1 predicts completion token j.
Shapes: B batch, L = P + C packed length, C completion positions, H hidden size,
V vocabulary, K cached top-k.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..core.entropy import token_entropy, token_stats
from ..core.fused_head import DEFAULT_CHUNK_BYTES, chunk_rows_for, fused_head_logprobs
from ..core.kl import topk_kl
from ..core.logprobs import policy_logprobs, policy_logprobs_and_kl


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, model.get_output_embeddings()


def completion_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, H) decoder states that predict each completion token (one decoder pass).

    Column P + j - 1 of a packed batch predicts completion token j.
    """
    decoder, _ = _decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    C = batch["completion_ids"].shape[1]
    return hidden[:, hidden.shape[1] - C - 1 : -1]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on a chunk of hidden states, with the model's final-logit softcap if any.

    The states take the head's dtype: TRL's GRPOTrainer keeps a bf16 model's final norm in
    fp32, whose output would otherwise meet a bf16 head (what autocast would do on a GPU).
    """
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def completion_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, V): only the logits that predict completion tokens (columns P - 1 .. P + C - 2).

    Asking the model for exactly those columns (an index tensor as ``logits_to_keep``)
    avoids a slice of a larger logits tensor, whose backward would allocate it again.
    """
    L = batch["input_ids"].shape[1]
    C = batch["completion_ids"].shape[1]
    keep = torch.arange(L - C - 1, L - 1, device=batch["input_ids"].device)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits


def prompt_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P - 1, V) logits that predict prompt tokens 2.., and their (B, P - 1) bool mask.

    Column j predicts the token at column j + 1; the columns before P - 1 predict prompt
    tokens (column P - 1 predicts the first completion token). A causal model's logits
    there depend on the prompt columns only, so this runs on the first P columns: its
    cost is the prompt's, not the whole sequence's. With left padding, column j predicts
    a real prompt token exactly when column j is itself a real token.
    """
    L = batch["input_ids"].shape[1]
    P = L - batch["completion_ids"].shape[1]
    mask = batch["attention_mask"][:, : max(P - 1, 0)].bool()
    if P < 2:  # one-token prompts: nothing predicts a prompt token
        vocab = model.get_output_embeddings().weight.shape[0]
        return torch.zeros((mask.shape[0], 0, vocab), device=mask.device), mask
    out = model(
        input_ids=batch["input_ids"][:, :P],
        attention_mask=batch["attention_mask"][:, :P],
        position_ids=batch["position_ids"][:, :P],
        logits_to_keep=torch.arange(0, P - 1, device=batch["input_ids"].device),
        use_cache=False,
    )
    return out.logits, mask


class LinearHead(NamedTuple):
    """The LM head as plain tensors: logits = softcap * tanh((h @ weight.T + bias) / softcap)."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    softcap: float | None


def linear_head(model: Any) -> LinearHead | None:
    """The model's LM head as a :class:`LinearHead`, or None when it is not a plain linear layer held whole here.

    None for a head that PEFT wraps (LoRA on ``lm_head``, ``modules_to_save``), a quantised
    one, or one whose weight FSDP or ZeRO-3 shards across processes: those run through the
    module itself.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    weight = head.weight
    if (type(weight) is not torch.nn.Parameter or weight.dim() != 2 or weight.numel() == 0
            or not weight.dtype.is_floating_point or hasattr(weight, "ds_id")):
        return None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LinearHead(weight, head.bias, float(softcap) if softcap else None)


def final_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, H) final decoder states at the completion positions, through ``model``'s own forward.

    :func:`completion_hidden` calls the decoder directly; this calls the outermost module
    (a DDP wrapper, a PEFT model) so its forward hooks run: DDP only all-reduces the
    gradients of a backward whose forward went through it. The head runs on no position
    (an empty ``logits_to_keep``); the last of the hidden states is the normed one the head
    reads.
    """
    L = batch["input_ids"].shape[1]
    C = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device),
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1][:, L - C - 1 : L - 1]


class PolicyTokenStats(NamedTuple):
    """Per completion position statistics of the policy the fork-gated loss reads; fp32 (B, C)."""

    logp: torch.Tensor  # log p_policy(sampled token), with gradient
    kl: torch.Tensor  # KL(base || policy), with gradient (top-k + rest bucket, or exact)
    entropy: torch.Tensor | None  # policy entropy at the requested temperature, no gradient; or None


def policy_token_stats(
    model: Any,
    peft_model: Any,
    batch: dict[str, torch.Tensor],
    *,
    kl_anchor: str,
    entropy_temperature: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    base_hidden: torch.Tensor | None = None,
) -> PolicyTokenStats:
    """The policy's log-probs, KL to the base and (optionally) entropy, never holding (B, C, V) logits.

    The decoder runs once for the policy (and once more, adapter disabled and without
    gradient, for ``kl_anchor: exact``); the LM head and everything after it run through
    :func:`reasonmaxxer.core.fused_head.fused_head_logprobs`, chunk of positions by chunk.
    A head that :func:`linear_head` cannot take apart falls back to full logits.

    Args:
        model: what the forward runs through (the PEFT model, or the DDP module around it).
        peft_model: the unwrapped PEFT model (for ``disable_adapter`` and the head).
        batch: a packed batch with ``completion_ids`` (B, C); for ``cached`` also the base's
            ``topk_ids`` (B, C, K) and ``topk_logp`` (B, C, K).
        kl_anchor: ``cached`` (KL on the base's top-k plus a rest bucket) or ``exact``
            (full-vocabulary KL against the adapter-disabled pass).
        entropy_temperature: if set, also the policy's entropy at that temperature.
        base_hidden: for ``exact``, the (B, C, H) base states when the caller has them already
            (:func:`base_token_stats`), so the adapter-disabled pass runs once.
    """
    if kl_anchor not in ("cached", "exact"):
        raise ValueError(f"kl_anchor must be 'cached' or 'exact', got {kl_anchor!r}")
    head = linear_head(peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model)
    if head is None:
        return _policy_token_stats_from_logits(model, peft_model, batch, kl_anchor, entropy_temperature)
    hidden = final_hidden(model, batch)
    if kl_anchor == "exact" and base_hidden is None:
        with torch.no_grad(), peft_model.disable_adapter():
            base_hidden = final_hidden(model, batch)
    stats = fused_head_logprobs(
        hidden, head.weight, batch["completion_ids"], bias=head.bias, softcap=head.softcap,
        extra_ids=batch["topk_ids"] if kl_anchor == "cached" else None,
        base_hidden=base_hidden if kl_anchor == "exact" else None,
        entropy_temperature=entropy_temperature, chunk_bytes=chunk_bytes,
    )
    kl = topk_kl(batch["topk_logp"], stats.extra_logp) if kl_anchor == "cached" else stats.kl
    return PolicyTokenStats(stats.logp, kl, stats.entropy)


class BaseTokenStats(NamedTuple):
    """The base's (adapter disabled) statistics at the completion positions; fp32 (B, C), no gradient."""

    logp: torch.Tensor  # log p_base(sampled token)
    entropy: torch.Tensor  # base entropy at the requested temperature
    hidden: torch.Tensor | None  # (B, C, H) the base's final states, for policy_token_stats; None without a linear head


@torch.no_grad()
def base_token_stats(model: Any, peft_model: Any, batch: dict[str, torch.Tensor], *, entropy_temperature: float,
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BaseTokenStats:
    """One adapter-disabled pass: the base's log-probs and entropy of a packed batch, what scoring stores.

    The head runs on chunks of positions (about ``chunk_bytes`` of fp32 logits each), as
    scoring does; the states are returned for the exact KL of :func:`policy_token_stats`.
    """
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    with peft_model.disable_adapter():
        if linear_head(inner) is None:
            stats = token_stats(completion_logits(model, batch), batch["completion_ids"],
                                entropy_temperature=entropy_temperature)
            return BaseTokenStats(stats["logp"], stats["entropy"], None)
        hidden = final_hidden(model, batch)
    B, C, _ = hidden.shape
    vocab = inner.get_output_embeddings().weight.shape[0]
    step = max(1, chunk_rows_for(vocab, chunk_bytes) // max(B, 1))
    parts = [token_stats(head_logits(inner, hidden[:, s : s + step]), batch["completion_ids"][:, s : s + step],
                         entropy_temperature=entropy_temperature) for s in range(0, C, step)]
    if not parts:
        empty = hidden.new_zeros((B, 0), dtype=torch.float32)
        return BaseTokenStats(empty, empty, hidden)
    return BaseTokenStats(torch.cat([p["logp"] for p in parts], 1), torch.cat([p["entropy"] for p in parts], 1), hidden)


def _policy_token_stats_from_logits(model: Any, peft_model: Any, batch: dict[str, torch.Tensor],
                                    kl_anchor: str, entropy_temperature: float | None) -> PolicyTokenStats:
    """:func:`policy_token_stats` through the model's own head: (B, C, V) policy (and base) logits."""
    logits = completion_logits(model, batch)
    if kl_anchor == "cached":
        logp, topk_logp, _ = policy_logprobs(logits, batch["completion_ids"], batch["topk_ids"])
        kl = topk_kl(batch["topk_logp"], topk_logp)
    else:
        with torch.no_grad(), peft_model.disable_adapter():
            base_logits = completion_logits(model, batch)
        logp, _, _, kl = policy_logprobs_and_kl(logits, batch["completion_ids"], base_logits)
        del base_logits
    entropy = None
    if entropy_temperature is not None:
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), temperature=entropy_temperature)
    return PolicyTokenStats(logp, kl, entropy)

"""Per-token Shannon entropy and the teacher-forced statistics scoring stores.

Pure functions on tensors. Shapes: B batch, C completion positions (or a chunk of them),
V vocabulary, K cached top-k; ``...`` any leading dimensions.
"""

from __future__ import annotations

from typing import Literal

import torch

from .ops import LN2, expectation


def token_entropy(
    logits: torch.Tensor, unit: Literal["nats", "bits"] = "nats", *, temperature: float = 1.0
) -> torch.Tensor:
    """Shannon entropy of softmax(logits / temperature) over the last axis.

    Args:
        logits: (..., V) in any float dtype; computed in fp32. Entries may be -inf
            (masked vocabulary); a row that is entirely -inf has entropy 0.
        unit: "nats" (natural log) or "bits".
        temperature: divides the logits first (the sampling temperature of the rollouts).

    Returns:
        (...) fp32 entropy; finite wherever the row's logits are finite or -inf, and NaN
        for a row holding a NaN or +inf logit (a broken model must not look certain).
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    entropy = entropy_from_logits(z)
    return entropy / LN2 if unit == "bits" else entropy


def entropy_from_logp(logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """H = -sum_v p_v log p_v from a log-softmax; -inf entries (p = 0) contribute 0, not nan.

    Args:
        logp: (..., V) normalised log-probabilities (not modified).
        p: (..., V) ``logp.exp()`` if the caller has it already.

    Returns:
        (...) entropy in nats, clamped at 0 (rounding can leave -1e-7).
    """
    p = logp.exp() if p is None else p
    return (-expectation(p, logp.clone())).clamp_min(0.0)


def entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """:func:`entropy_from_logp` of ``log_softmax(z)``; a fully -inf row has entropy 0.

    The row's max is subtracted before anything else: that subtraction is exact for every
    logit within a factor of two of the max (the ones that carry the mass), and what is
    left is O(1), so the logsumexp rounds at the scale of 1, not of the offset. Subtracting
    ``logsumexp(z)`` directly rounds it at |z| (about 1e-3 nats of error at an offset of 1e4).

    Args:
        z: (..., V) fp32 logits, already divided by any temperature.

    Returns:
        (...) fp32 entropy in nats; NaN for a row with a NaN or +inf logit.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    # A row whose max is -inf (fully masked), +inf or NaN is left unshifted: its logsumexp
    # below is -inf, +inf or NaN, and that decides its entropy.
    z = z - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    finite = torch.isfinite(lse)
    logp = z - torch.where(finite, lse, torch.zeros_like(lse))
    entropy = entropy_from_logp(logp)
    lse = lse.squeeze(-1)
    # A fully masked row (lse -inf) has no distribution: define its entropy as 0. A NaN or
    # +inf logit (lse NaN or +inf) is a broken model: NaN, so callers can see it.
    entropy = torch.where(finite.squeeze(-1), entropy, torch.zeros_like(entropy))
    return torch.where(torch.isnan(lse) | (lse == float("inf")), torch.full_like(entropy, float("nan")), entropy)


def token_stats(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    top_k: int = 0,
    entropy_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Everything scoring needs from one chunk of logits, from one log-softmax.

    Args:
        logits: (B, C, V) logits predicting the tokens in ``target_ids``.
        target_ids: (B, C) the sampled tokens.
        top_k: how many of the highest log-probs to keep per position (0: none).
        entropy_temperature: the temperature the entropy is measured at (the log-probs
            are always at temperature 1, the policy's own scale).

    Returns:
        dict with ``entropy`` (B, C) nats (NaN where the logits hold a NaN or +inf),
        ``logp`` (B, C) log p(target),
        and, when top_k > 0, ``topk_logp`` (B, C, K) and ``topk_ids`` (B, C, K).
    """
    z = logits.float()
    logp_all = torch.log_softmax(z, dim=-1)  # the one (B, C, V) intermediate we keep
    out: dict[str, torch.Tensor] = {
        "logp": logp_all.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1),
    }
    if entropy_temperature == 1.0:
        lse = torch.logsumexp(z, dim=-1)
        broken = torch.isnan(lse) | (lse == float("inf"))
        entropy = entropy_from_logp(logp_all).masked_fill(lse == float("-inf"), 0.0)  # fully masked row: 0
        out["entropy"] = entropy.masked_fill(broken, float("nan"))
    else:
        out["entropy"] = entropy_from_logits(z / entropy_temperature)
    if top_k > 0:
        topk = logp_all.topk(min(top_k, z.shape[-1]), dim=-1)
        out["topk_logp"] = topk.values
        out["topk_ids"] = topk.indices
    return out

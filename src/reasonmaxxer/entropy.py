"""Per-token entropy, teacher-forced token statistics, and the fork gates built on them.

Everything here is a pure function on tensors. Shapes use B (batch), T (completion
positions), V (vocabulary) and K (cached top-k).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch

GateMode = Literal["threshold", "quantile", "topk", "all", "random"]
GATE_MODES: tuple[str, ...] = ("threshold", "quantile", "topk", "all", "random")
REFERENCE_MODES: tuple[str, ...] = ("threshold", "quantile", "topk")

_LN2 = math.log(2.0)


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
        (...) fp32 entropy, finite everywhere.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    entropy = _entropy_from_scaled_logits(z)
    return entropy / _LN2 if unit == "bits" else entropy


def _entropy_from_scaled_logits(z: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v from log p = z - logsumexp(z); -inf logits contribute 0 (not nan).

    Subtracting the logsumexp first keeps fp32 exact for logits of any offset (the form
    logsumexp(z) - sum p z loses nats at |z| ~ 1e4).
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    finite = torch.isfinite(lse)
    logp = z - torch.where(finite, lse, torch.zeros_like(lse))
    p = torch.exp(logp)  # exp(-inf) = 0 where masked
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    # A fully masked row has no distribution: define its entropy as 0.
    entropy = torch.where(finite.squeeze(-1), entropy, torch.zeros_like(entropy))
    return entropy.clamp_min(0.0)


def token_stats(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    top_k: int = 0,
    entropy_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Everything scoring needs from one chunk of logits, from one log-softmax.

    Args:
        logits: (B, T, V) logits predicting the tokens in ``target_ids``.
        target_ids: (B, T) the sampled tokens.
        top_k: how many of the highest log-probs to keep per position (0: none).
        entropy_temperature: the temperature the entropy is measured at (the log-probs
            are always at temperature 1, the policy's own scale).

    Returns:
        dict with ``entropy`` (B, T) nats, ``logp`` (B, T) log p(target),
        and, when top_k > 0, ``topk_logp`` (B, T, K) and ``topk_ids`` (B, T, K).
    """
    z = logits.float()
    logp_all = torch.log_softmax(z, dim=-1)  # the one (B, T, V) intermediate we keep
    out: dict[str, torch.Tensor] = {
        "logp": logp_all.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1),
    }
    if entropy_temperature == 1.0:
        p = logp_all.exp()
        plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(p))
        out["entropy"] = (-plogp.sum(-1)).clamp_min(0.0)
        del p, plogp
    else:
        out["entropy"] = _entropy_from_scaled_logits(z / entropy_temperature)
    if top_k > 0:
        topk = logp_all.topk(min(top_k, z.shape[-1]), dim=-1)
        out["topk_logp"] = topk.values
        out["topk_ids"] = topk.indices
    return out


def _linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation) without its 16M-element limit."""
    sorted_values, _ = torch.sort(values.float())
    pos = q * (sorted_values.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, sorted_values.numel() - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def quantile_threshold(
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    quantile: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The entropy value above which the top ``quantile`` of completion tokens lie.

    Same semantics as TRL's ``GRPOTrainer.get_high_entropy_mask`` with
    ``top_entropy_quantile = quantile``: the (1 - quantile) linear quantile of the
    completion tokens' entropies, pooled across processes by ``gather`` (a function from
    this process's 1-D tensor to the concatenation over all processes). None when no
    process has a completion token.
    """
    local = entropy[completion_mask.bool()].float()
    pooled = gather(local) if gather is not None else local
    if pooled.numel() == 0:
        return None
    return _linear_quantile(pooled, 1.0 - quantile)


def fork_mask(
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: GateMode,
    tau: float | None = None,
    quantile: float | None = None,
    k: int | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: str = "threshold",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which completion positions are decision forks.

    Args:
        entropy: (B, T) per-position entropy (nats).
        completion_mask: (B, T) 1 at completion tokens, 0 at prompt and padding.
        mode: ``threshold`` (entropy > tau), ``quantile`` (top ``quantile`` fraction of
            the batch's completion tokens, ties at the cut included, as TRL does),
            ``topk`` (the k highest-entropy completion positions of each sequence),
            ``all`` (every completion position: the dense control), ``random`` (the
            control: as many uniformly drawn completion positions per sequence as the
            ``reference`` gate picks there).
        gather: for ``quantile`` across processes, see :func:`quantile_threshold`.
        reference: for ``random``, the entropy gate whose per-sequence counts it matches.
        generator: for ``random``, the source of randomness (seed it for reproducibility).

    Returns:
        (B, T) bool, never true where ``completion_mask`` is 0.
    """
    valid = completion_mask.bool()
    if mode == "threshold":
        if tau is None:
            raise ValueError("fork_mask(mode='threshold') needs tau")
        return (entropy > tau) & valid
    if mode == "quantile":
        if quantile is None or not 0.0 < quantile <= 1.0:
            raise ValueError(f"fork_mask(mode='quantile') needs 0 < quantile <= 1, got {quantile}")
        cut = quantile_threshold(entropy, valid, quantile, gather)
        if cut is None:
            return torch.zeros_like(valid)
        return (entropy >= cut) & valid
    if mode == "topk":
        if k is None or k < 1:
            raise ValueError(f"fork_mask(mode='topk') needs k >= 1, got {k}")
        if entropy.shape[-1] == 0:
            return valid.clone()
        masked = entropy.float().masked_fill(~valid, float("-inf"))
        kk = min(k, entropy.shape[-1])
        idx = masked.topk(kk, dim=-1).indices
        picked = torch.zeros_like(valid).scatter(-1, idx, True)
        # A sequence with fewer than k completion tokens picks some -inf slots: drop them.
        return picked & valid
    if mode == "all":
        return valid.clone()
    if mode == "random":
        if reference not in REFERENCE_MODES:
            raise ValueError(f"fork_mask(mode='random') needs reference in {REFERENCE_MODES}, got {reference!r}")
        matched = fork_mask(entropy, completion_mask, mode=reference, tau=tau, quantile=quantile, k=k, gather=gather)
        return random_positions(matched.sum(-1), valid, generator)
    raise ValueError(f"unknown gate mode {mode!r}; expected one of {GATE_MODES}")


def random_positions(counts: torch.Tensor, completion_mask: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """counts[b] completion positions of row b, drawn uniformly without replacement.

    Args:
        counts: (B,) how many positions per row (at most the row's completion length).
        completion_mask: (B, T) the positions that may be drawn.

    Returns:
        (B, T) bool with exactly counts[b] True in row b, all inside ``completion_mask``.
    """
    valid = completion_mask.bool()
    keys = torch.rand(valid.shape, generator=generator).to(valid.device)
    keys = keys.masked_fill(~valid, -1.0)  # positions that may not be drawn sort last
    order = keys.argsort(dim=-1, descending=True)
    rank = order.argsort(dim=-1)  # rank of each position in its row's random order
    return (rank < counts.unsqueeze(-1)) & valid


def gate_mask(gate: Any, entropy: torch.Tensor, completion_mask: torch.Tensor, *,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`fork_mask` with the settings of a gate config (mode, tau, quantile, k, reference)."""
    return fork_mask(entropy, completion_mask, mode=gate.mode, tau=gate.tau, quantile=gate.quantile, k=gate.k,
                     reference=gate.reference, gather=gather, generator=generator)

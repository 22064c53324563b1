"""KL(base || policy) per position: full-vocabulary, from log-probs, or from the cached top-k.

Shapes: B batch, C completion positions, V vocabulary, K cached top-k; ``...`` any
leading dimensions.
"""

from __future__ import annotations

import torch

from .ops import expectation


def kl_from_logp(base_logp: torch.Tensor, policy_logp: torch.Tensor,
                 base_p: torch.Tensor | None = None) -> torch.Tensor:
    """sum_v p_b (log p_b - log p_policy) from two log-softmaxes (no gradient bookkeeping).

    Identical rows give exactly 0; a token the base rules out contributes 0; one the
    base supports and the policy rules out gives +inf.

    Args:
        base_logp, policy_logp: (..., V) normalised log-probabilities (not modified).
        base_p: (..., V) ``base_logp.exp()`` if the caller has it.

    Returns:
        (...) KL in nats.
    """
    base_p = base_logp.exp() if base_p is None else base_p
    return expectation(base_p, base_logp - policy_logp)


def exact_kl(base_logits: torch.Tensor, policy_logits: torch.Tensor,
             policy_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary KL(base || policy) per position, differentiable in the policy.

    Written as  sum_v p_b log p_b  -  sum_v p_b z_v  +  logsumexp(z)  (z: policy logits), so
    the policy side needs no log-softmax: its gradient is softmax(z) - p_b, the
    logsumexp can be shared with :func:`reasonmaxxer.core.logprobs.policy_logprobs`, and
    the base side runs without autograd. (The training step uses the fused
    :func:`~reasonmaxxer.core.logprobs.policy_logprobs_and_kl`; this is its unfused form.)

    Args:
        base_logits: (B, C, V).
        policy_logits: (B, C, V).
        policy_lse: (B, C) logsumexp of ``policy_logits`` if already computed.

    Returns:
        (B, C) KL in nats (gradient flows into ``policy_logits`` only if it requires it).
    """
    with torch.no_grad():
        base_logp = torch.log_softmax(base_logits.float(), dim=-1)
        base_p = base_logp.exp()
        base_neg_entropy = expectation(base_p, base_logp)  # sum p log p; consumes base_logp
        del base_logp
    z = policy_logits.float()
    cross = base_p * z
    if torch.isinf(z).any():  # masked policy logits: 0 * -inf where the base has no mass
        cross = torch.where(base_p > 0, cross, torch.zeros_like(cross))
    if policy_lse is None:
        policy_lse = torch.logsumexp(z, dim=-1)
    return base_neg_entropy - cross.sum(-1) + policy_lse


def prompt_kl(base_logits: torch.Tensor, policy_logits: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(base || policy) at the prompt positions, 0 where the mask is off.

    For ``loss.kl_on_prompt``: the paper anchors every next-token prediction that is not
    a fork, the predictions of prompt tokens included.

    Args:
        base_logits, policy_logits: (B, P, V) logits at prompt positions.
        prompt_mask: (B, P) bool, the positions that predict a real prompt token.

    Returns:
        (B, P) KL in nats (differentiable in ``policy_logits``), 0 off the mask (where a
        padded position's logits may be anything).
    """
    kl = exact_kl(base_logits, policy_logits)
    return torch.where(prompt_mask.bool(), kl, torch.zeros_like(kl))


def topk_kl(base_topk_logp: torch.Tensor, policy_topk_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || policy) on the base's top-k tokens plus one bucket for the rest.

    This is the exact KL between the two distributions coarsened to K + 1 outcomes, so it
    is never above the full KL and equals it when the base's mass outside its top-k is
    ~0 (the usual case at k = 64). The policy's top-k mass is capped at 1 - 1e-6 (its rest
    mass floored at 1e-6) so the rest bucket's log stays finite: where the policy's true
    rest mass is below 1e-6 the rest bucket's term, and with it the KL, is underestimated
    and its gradient bounded.

    Args:
        base_topk_logp: (B, C, K) base log-probs of its own top-k tokens (cached).
        policy_topk_logp: (B, C, K) policy log-probs of the same tokens.

    Returns:
        (B, C) KL in nats.
    """
    base_p = base_topk_logp.float().exp()
    head_terms = base_p * (base_topk_logp.float() - policy_topk_logp)
    head = torch.where(base_p > 0, head_terms, torch.zeros_like(head_terms)).sum(-1)
    base_tail = (1.0 - base_p.sum(-1)).clamp_min(0.0)
    policy_head = policy_topk_logp.exp().sum(-1).clamp(max=1.0 - 1e-6)
    policy_log_tail = torch.log1p(-policy_head)
    tail = torch.where(
        base_tail > 0,
        base_tail * (torch.log(base_tail.clamp_min(1e-30)) - policy_log_tail),
        torch.zeros_like(base_tail),
    )
    return head + tail

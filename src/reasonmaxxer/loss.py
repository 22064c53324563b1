"""The fork-gated objective: a contrastive term at forks plus a KL anchor elsewhere.

    L = sum_{t in F} w_t * (-log pi_theta(y_t)) / |F|  +  beta * sum_{t in N} KL(base || theta)_t / |N|

F are the gated (fork) completion positions, N the other completion positions, and w_t
the rollout's advantage. Pure functions; shapes: B batch, T completion positions,
V vocabulary, K cached top-k.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

LossVariant = Literal["signed", "positive_only", "hinge", "split"]
LOSS_VARIANTS: tuple[str, ...] = ("signed", "positive_only", "hinge", "split")


def gather_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, topk_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of chosen tokens without materialising a (B, T, V) log-softmax.

    Args:
        logits: (B, T, V) policy logits.
        target_ids: (B, T) sampled tokens.
        topk_ids: (B, T, K) token ids whose log-probs are also wanted (the base top-k).

    Returns:
        (B, T) log p(target) in fp32, and (B, T, K) log p(topk_ids) or None.
    """
    logp, topk_logp, _ = policy_logprobs(logits, target_ids, topk_ids)
    return logp, topk_logp


def policy_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, topk_ids: torch.Tensor | None = None,
    *, chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`gather_logprobs` plus the logsumexp (B, T).

    Fused: the forward keeps no (B, T, V) intermediate (the logsumexp runs over chunks of
    positions in fp32) and the backward writes the whole gradient into one (B, T, V)
    tensor, as a fused cross-entropy does.
    """
    logp, topk_logp, lse, _ = _fused(logits, target_ids, topk_ids, None, chunk_rows)
    return logp, topk_logp, lse


def policy_logprobs_and_kl(
    logits: torch.Tensor, target_ids: torch.Tensor, base_logits: torch.Tensor,
    topk_ids: torch.Tensor | None = None, *, chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`policy_logprobs` and the full-vocabulary KL(base || policy) (B, T) in one pass.

    The same value as :func:`exact_kl`, but the base softmax lives one chunk of positions
    at a time (it is recomputed from ``base_logits`` in the backward) and the KL gradient,
    ``softmax(z) - p_base``, is added into the same (B, T, V) gradient tensor: no other
    (B, T, V) tensor is allocated. ``base_logits`` takes no gradient.
    """
    return _fused(logits, target_ids, topk_ids, base_logits.detach(), chunk_rows)


def _fused(logits, target_ids, topk_ids, base_logits, chunk_rows):
    ids = target_ids.unsqueeze(-1)
    if topk_ids is not None:
        ids = torch.cat([ids, topk_ids.long()], dim=-1)
    B, T, V = logits.shape
    if chunk_rows is None:
        # ~16 MB of fp32 per chunk temporary: small enough for the allocator to reuse one
        # block chunk after chunk instead of mapping fresh pages for each.
        chunk_rows = max(1, (1 << 22) // V)
    picked, lse, kl = _TokenLogprobs.apply(logits, ids, base_logits, chunk_rows)
    kl = kl if base_logits is not None else None
    return picked[..., 0], (picked[..., 1:] if topk_ids is not None else None), lse, kl


def _base_chunk(base: torch.Tensor, base_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_base, p_base > 0) of a chunk of rows (N, V)."""
    p = torch.exp(base.float() - base_lse.unsqueeze(-1))
    return p, p > 0


class _TokenLogprobs(torch.autograd.Function):
    """(logits, ids[, base]) -> (logits[ids] - lse, lse, KL(base || softmax(logits))), memory-lean.

    With z the logits: d picked_j / dz = onehot(id_j) - softmax(z), d lse / dz = softmax(z)
    and d KL / dz = softmax(z) - p_base, so
    dz = softmax(z) * (g_lse + g_kl - sum_j g_j) + sum_j g_j onehot(id_j) - g_kl p_base.
    Everything runs over chunks of flattened (B*T) rows.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, base: torch.Tensor | None,
                chunk_rows: int) -> tuple[torch.Tensor, ...]:
        B, T, V = logits.shape
        z, N = logits.reshape(-1, V), B * T
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        kl = torch.zeros(N, dtype=torch.float32, device=logits.device)
        base_flat = base.reshape(-1, V) if base is not None else None
        base_lse = torch.empty(N, dtype=torch.float32, device=logits.device) if base is not None else None
        for s in range(0, N, chunk_rows):
            zc = z[s : s + chunk_rows].float()
            lse[s : s + chunk_rows] = torch.logsumexp(zc, dim=-1)
            if base_flat is not None:
                bc = base_flat[s : s + chunk_rows].float()
                base_lse[s : s + chunk_rows] = blse = torch.logsumexp(bc, dim=-1)
                p, has_mass = _base_chunk(bc, blse)
                # sum_v p (log p - z) + lse(z); where p = 0 the term is 0 even if z or log p is -inf.
                term = torch.where(has_mass, p * (bc - blse.unsqueeze(-1) - zc), torch.zeros_like(p))
                kl[s : s + chunk_rows] = term.sum(-1) + lse[s : s + chunk_rows]
        lse = lse.view(B, T)
        picked = logits.gather(-1, ids).float() - lse.unsqueeze(-1)
        ctx.save_for_backward(logits, ids, lse, base, base_lse)
        ctx.chunk_rows = chunk_rows
        if base is None:
            ctx.mark_non_differentiable(kl)
        return picked, lse, kl.view(B, T)

    @staticmethod
    def backward(ctx: Any, g_picked: torch.Tensor | None, g_lse: torch.Tensor | None,
                 g_kl: torch.Tensor | None) -> tuple[Any, ...]:
        logits, ids, lse, base, base_lse = ctx.saved_tensors
        B, T, V = logits.shape
        N, c = B * T, ctx.chunk_rows
        zeros = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
        g_picked = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device) if g_picked is None else g_picked
        g_lse = zeros if g_lse is None else g_lse
        g_kl = zeros if g_kl is None or base is None else g_kl
        coef = (g_lse + g_kl - g_picked.sum(-1)).reshape(N, 1)  # the softmax's weight per row
        g_kl, lse = g_kl.reshape(N, 1), lse.reshape(N, 1)
        z = logits.reshape(N, V)
        grad = torch.empty_like(logits)
        g = grad.view(N, V)
        for s in range(0, N, c):
            rows = slice(s, s + c)
            if g.dtype == torch.float32:  # write softmax * coef straight into the gradient
                out = torch.sub(z[rows], lse[rows], out=g[rows])
                out.exp_().mul_(coef[rows])
            else:
                g[rows] = torch.exp(z[rows].float() - lse[rows]).mul_(coef[rows])
            if base is not None:
                p, _ = _base_chunk(base.reshape(N, V)[rows], base_lse[rows])
                g[rows] -= (p * g_kl[rows]).to(g.dtype)
        grad.scatter_add_(-1, ids, g_picked.to(grad.dtype))
        return grad, None, None, None


def exact_kl(base_logits: torch.Tensor, policy_logits: torch.Tensor,
             policy_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary KL(base || policy) per position.

    Written as  sum_v p_b log p_b  -  sum_v p_b z_v  +  logsumexp(z)  (z: policy logits), so
    the policy side needs no log-softmax: its gradient is softmax(z) - p_b, the
    logsumexp can be shared with :func:`policy_logprobs`, and the base side runs without
    autograd.

    Args:
        base_logits, policy_logits: (B, T, V).
        policy_lse: (B, T) logsumexp of ``policy_logits`` if already computed.

    Returns:
        (B, T) KL in nats (gradient flows into ``policy_logits`` only if it requires it).
    """
    with torch.no_grad():
        base_logp = torch.log_softmax(base_logits.float(), dim=-1)
        base_p = base_logp.exp()
        plogp = base_logp.mul_(base_p)  # in place: base_logp is not needed again
        if torch.isnan(plogp).any():  # tokens the base rules out: 0 * -inf contributes 0
            plogp = torch.nan_to_num(plogp, nan=0.0)
        base_neg_entropy = plogp.sum(-1)
        del base_logp, plogp
    z = policy_logits.float()
    cross = base_p * z
    if torch.isinf(z).any():  # masked policy logits: 0 * -inf where the base has no mass
        cross = torch.where(base_p > 0, cross, torch.zeros_like(cross))
    if policy_lse is None:
        policy_lse = torch.logsumexp(z, dim=-1)
    return base_neg_entropy - cross.sum(-1) + policy_lse


def topk_kl(base_topk_logp: torch.Tensor, policy_topk_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || policy) on the base's top-k tokens plus one bucket for the rest.

    This is the exact KL between the two distributions coarsened to K + 1 outcomes, so it
    is never above the full KL and equals it when the base's mass outside its top-k is
    ~0 (the usual case at k = 64).

    Args:
        base_topk_logp: (B, T, K) base log-probs of its own top-k tokens (cached).
        policy_topk_logp: (B, T, K) policy log-probs of the same tokens.

    Returns:
        (B, T) KL in nats.
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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (not nan) on an empty mask; keeps the graph."""
    # where, not multiply: an inf/nan outside the mask (padding) must not leak in as 0 * inf.
    picked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp_min(1).to(values.dtype)


def fork_gated_loss(
    policy_logp: torch.Tensor,
    base_logp: torch.Tensor,
    advantages: torch.Tensor,
    fork_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor,
    *,
    kl_coef: float,
    variant: LossVariant = "signed",
    neg_prob_floor: float = 0.05,
    hinge_margin: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The fork-gated contrastive loss with a KL anchor at non-fork positions.

    Args:
        policy_logp: (B, T) log pi_theta of the sampled tokens (requires grad).
        base_logp: (B, T) log pi_base of the same tokens (no grad).
        advantages: (B,) per-rollout advantage, > 0 for better-than-average rollouts.
        fork_mask: (B, T) bool, the gated positions (subset of the completion).
        completion_mask: (B, T) 1 at completion tokens.
        kl: (B, T) per-position KL(base || theta) (requires grad), exact or top-k.
        kl_coef: beta, the weight of the anchor.
        variant: ``signed`` (advantage-signed, normalised by |F|); ``positive_only``
            (only forks of A > 0 rollouts, normalised by their count: gated SFT);
            ``hinge`` (|A| * relu(margin - sign(A) * (log pi_theta - log pi_base)):
            stops pushing once the log-ratio passed the margin); ``split`` (positive and
            negative forks normalised separately, then added).
        neg_prob_floor: for ``signed``/``split``: a negative-advantage fork whose token
            probability under the policy is already below this gets no more push-down.
            The paper's form has no floor and the loss runs to -inf; this bounds it below
            by -max|A| * log(1 / floor).
        hinge_margin: the margin of ``hinge`` in nats.

    Returns:
        The scalar loss and a dict of float statistics (see the keys at the end).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {LOSS_VARIANTS}")
    completion = completion_mask.bool()
    forks = fork_mask.bool() & completion
    nonforks = completion & ~forks
    adv = advantages.float().unsqueeze(-1).expand_as(policy_logp)
    pos_forks = forks & (adv > 0)
    neg_forks = forks & (adv < 0)
    n_forks = forks.sum()

    with torch.no_grad():
        floored = neg_forks & (policy_logp.exp() < neg_prob_floor)
    active_neg = neg_forks & ~floored
    nll = -policy_logp

    if variant == "signed":
        pushed = torch.where(pos_forks | active_neg, adv * nll, torch.zeros_like(nll))
        fork_term = pushed.sum() / n_forks.clamp_min(1)
    elif variant == "positive_only":
        fork_term = _masked_mean(adv * nll, pos_forks)
    elif variant == "split":
        # Floored negatives stay in the count (as in ``signed``): flooring one fork must
        # not raise the push-down on the others.
        neg_sum = torch.where(active_neg, adv * nll, torch.zeros_like(nll)).sum()
        fork_term = _masked_mean(adv * nll, pos_forks) + neg_sum / neg_forks.sum().clamp_min(1)
    else:  # hinge
        log_ratio = policy_logp - base_logp.float()
        hinge = torch.relu(hinge_margin - torch.sign(adv) * log_ratio) * adv.abs()
        fork_term = _masked_mean(hinge, forks)

    kl_term = _masked_mean(kl, nonforks)
    loss = fork_term + kl_coef * kl_term

    with torch.no_grad():
        dlogp = policy_logp - base_logp.float()
        n_completion = completion.sum().clamp_min(1)
        stats = {
            "loss": loss.item(),
            "fork_term": fork_term.item(),
            "kl_term": kl_term.item(),
            "fork_fraction": (n_forks / n_completion).item(),
            "forks": n_forks.item(),
            "forks_correct": pos_forks.sum().item(),
            "forks_wrong": neg_forks.sum().item(),
            "forks_floored": floored.sum().item(),
            "no_fork": float(n_forks.item() == 0),
            "dlogp_pos_forks": _masked_mean(dlogp, pos_forks).item(),
            "dlogp_neg_forks": _masked_mean(dlogp, neg_forks).item(),
            "kl_fork_mean": _masked_mean(kl, forks).item(),
            "kl_nonfork_mean": _masked_mean(kl, nonforks).item(),
        }
    return loss, stats

"""The fork-gated objective: a contrastive term at forks plus a KL anchor elsewhere.

    L = sum_{t in F} w_t * (-log pi_theta(y_t)) / |F|  +  beta * sum_{t in N} KL(base || theta)_t / |N|

F are the gated (fork) completion positions, N the other completion positions (and,
optionally, the prompt positions), and w_t the rollout's advantage. Pure functions;
shapes: B batch, C completion positions, P prompt positions.
"""

from __future__ import annotations

import torch

from .ops import masked_mean
from .options import FLOORED_FORKS, LOSS_VARIANTS, FlooredForks, LossVariant  # noqa: F401 (re-exported)

LOSS_STATS: tuple[str, ...] = (
    "loss", "fork_term", "kl_term", "fork_fraction", "forks", "forks_correct", "forks_wrong", "forks_floored",
    "no_fork", "dlogp_pos_forks", "dlogp_neg_forks", "kl_fork_mean", "kl_nonfork_mean",
)
"""The keys of the statistics :func:`fork_gated_loss` returns, in order."""


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
    hinge_margin_neg: float | None = None,
    floored_forks: FlooredForks = "drop",
    prompt_kl: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fork-gated contrastive loss with a KL anchor at non-fork positions.

    Args:
        policy_logp: (B, C) log pi_theta of the sampled tokens (requires grad).
        base_logp: (B, C) log pi_base of the same tokens (no grad).
        advantages: (B,) per-rollout advantage, > 0 for better-than-average rollouts.
        fork_mask: (B, C) bool, the gated positions (subset of the completion).
        completion_mask: (B, C) 1 at completion tokens.
        kl: (B, C) per-position KL(base || theta) (requires grad), exact or top-k.
        kl_coef: beta, the weight of the anchor.
        variant: ``signed`` (advantage-signed, normalised by |F|); ``positive_only``
            (only forks of A > 0 rollouts, normalised by their count: gated SFT);
            ``hinge`` (|A| * relu(margin - sign(A) * (log pi_theta - log pi_base)), the
            mean over forks: stops pushing once the log-ratio passed the margin; with
            margins m_pos, m_neg this is the paper's delta_hinge, relu(m_pos - D) * |A| at
            correct forks and relu(D + m_neg) * |A| at wrong ones); ``split`` (positive and
            negative forks normalised separately, then added); ``correct_sft`` (the mean
            NLL over forks of A > 0 rollouts, unweighted; every other completion position,
            wrong-rollout forks included, joins the KL-anchored set).
        neg_prob_floor: for ``signed``/``split``: a negative-advantage fork whose token
            probability under the policy is already below this (at or below, with
            ``floored_forks="anchor"``) gets no more push-down; 0 turns the floor off.
            Without a floor the loss runs to -inf; this bounds it below by
            -max|A| * log(1 / floor).
        hinge_margin: the margin of ``hinge`` in nats (at correct forks, and at wrong
            ones unless ``hinge_margin_neg`` is given).
        hinge_margin_neg: the margin of ``hinge`` at wrong (A < 0) forks.
        floored_forks: ``drop`` (a floored fork stays in the fork count |F|, with neither
            push nor anchor) or ``anchor`` (it leaves the fork set: the fork term is
            normalised by |F_eff| = |F| - floored, and the fork joins the anchored set, as
            the paper's code does). With ``anchor`` a fork of a rollout whose advantage is
            exactly 0 also leaves the fork set for the anchor, in every variant: the
            paper's forks are those of positive and negative rollouts only.
        prompt_kl: (B, P) per-position KL(base || theta) at prompt positions; with
            ``prompt_mask`` they join the anchored set (one mean over both).
        prompt_mask: (B, P) bool, the prompt positions that count (real tokens only).

    Returns:
        The () loss and its statistics: a dict of () fp32 tensors, detached, with the
        keys of :data:`LOSS_STATS`. They stay on the loss's device, so reading them costs
        no host sync until a caller asks (:func:`stats_to_floats` does it in one).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {LOSS_VARIANTS}")
    if floored_forks not in FLOORED_FORKS:
        raise ValueError(f"unknown floored_forks {floored_forks!r}; expected one of {FLOORED_FORKS}")
    completion = completion_mask.bool()
    forks = fork_mask.bool() & completion
    nonforks = completion & ~forks
    adv = advantages.float().unsqueeze(-1).expand_as(policy_logp)
    pos_forks = forks & (adv > 0)
    neg_forks = forks & (adv < 0)
    n_forks = forks.sum()

    with torch.no_grad():
        p = policy_logp.exp()
        if variant not in ("signed", "split"):  # the floor acts in these two only
            floored = torch.zeros_like(neg_forks)
        elif floored_forks == "anchor":  # the paper's rule: p <= floor, and floor 0 is off
            floored = neg_forks & (p <= neg_prob_floor) if neg_prob_floor > 0 else torch.zeros_like(neg_forks)
        else:
            floored = neg_forks & (p < neg_prob_floor)
    active_neg = neg_forks & ~floored
    nll = -policy_logp
    # With ``anchor`` (the paper's rule) the fork set is the forks of rollouts with a
    # non-zero advantage that are not floored: a fork of an A = 0 rollout (a non-binary
    # reward at the group mean) carries no signal, so it leaves the count and joins the
    # anchor like a floored one. With ``drop`` both stay in the count, unanchored.
    leaves = floored | (forks & (adv == 0)) if floored_forks == "anchor" else torch.zeros_like(floored)
    anchored = nonforks | leaves
    counted_forks = forks & ~leaves
    counted_neg = neg_forks & ~leaves

    if variant == "signed":
        pushed = torch.where(pos_forks | active_neg, adv * nll, torch.zeros_like(nll))
        fork_term = pushed.sum() / counted_forks.sum().clamp_min(1)
    elif variant == "positive_only":
        fork_term = masked_mean(adv * nll, pos_forks)
    elif variant == "correct_sft":
        fork_term = masked_mean(nll, pos_forks)
        anchored = completion & ~pos_forks
    elif variant == "split":
        # With ``drop``, floored negatives stay in the count (as in ``signed``): flooring
        # one fork must not raise the push-down on the others.
        neg_sum = torch.where(active_neg, adv * nll, torch.zeros_like(nll)).sum()
        fork_term = masked_mean(adv * nll, pos_forks) + neg_sum / counted_neg.sum().clamp_min(1)
    else:  # hinge
        log_ratio = policy_logp - base_logp.float()
        margin_neg = hinge_margin if hinge_margin_neg is None else hinge_margin_neg
        margin = torch.where(adv < 0, torch.full_like(adv, margin_neg), torch.full_like(adv, hinge_margin))
        hinge = torch.relu(margin - torch.sign(adv) * log_ratio) * adv.abs()
        fork_term = masked_mean(hinge, counted_forks)

    kl_term = _anchor_mean(kl, anchored, prompt_kl, prompt_mask)
    loss = fork_term + kl_coef * kl_term

    with torch.no_grad():
        dlogp = policy_logp - base_logp.float()
        values = (
            loss, fork_term, kl_term, n_forks / completion.sum().clamp_min(1), n_forks, pos_forks.sum(),
            neg_forks.sum(), floored.sum(), n_forks == 0, masked_mean(dlogp, pos_forks),
            masked_mean(dlogp, neg_forks), masked_mean(kl, forks), masked_mean(kl, nonforks),
        )
        stats = {key: v.detach().float() for key, v in zip(LOSS_STATS, values)}
    return loss, stats


def _anchor_mean(kl: torch.Tensor, anchored: torch.Tensor, prompt_kl: torch.Tensor | None,
                 prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """One mean of the KL over the anchored completion positions and the prompt positions.

    Args:
        kl, anchored: (B, C) the completion KL and the anchored positions.
        prompt_kl, prompt_mask: (B, P) or None.

    Returns:
        () the mean (0 on an empty set).
    """
    if prompt_kl is None:
        return masked_mean(kl, anchored)
    if prompt_mask is None:
        raise ValueError("fork_gated_loss: prompt_kl needs prompt_mask")
    pm = prompt_mask.bool()
    total = torch.where(anchored, kl, torch.zeros_like(kl)).sum() + torch.where(
        pm, prompt_kl, torch.zeros_like(prompt_kl)).sum()
    return total / (anchored.sum() + pm.sum()).clamp_min(1).to(total.dtype)


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """() tensors to Python floats with one device sync (not one per statistic)."""
    if not stats:
        return {}
    return dict(zip(stats, torch.stack([v.detach().float().reshape(()) for v in stats.values()]).tolist()))

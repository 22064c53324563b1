"""The fork-gated objective: a contrastive term at forks plus a KL anchor elsewhere.

    L = sum_{t in F} w_t * (-log pi_theta(y_t)) / |F|  +  beta * sum_{t in N} KL(base || theta)_t / |N|

F are the gated (fork) completion positions, N the other completion positions, and w_t
the rollout's advantage. Pure functions; shapes: B batch, C completion positions.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from .ops import masked_mean

LossVariant = Literal["signed", "positive_only", "hinge", "split"]
"""``signed``: A * NLL at forks; ``positive_only``: gated SFT on correct rollouts;
``hinge``: on log pi - log pi_base; ``split``: positive and negative forks normalised apart."""
LOSS_VARIANTS: tuple[str, ...] = typing.get_args(LossVariant)

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
            ``hinge`` (|A| * relu(margin - sign(A) * (log pi_theta - log pi_base)):
            stops pushing once the log-ratio passed the margin); ``split`` (positive and
            negative forks normalised separately, then added).
        neg_prob_floor: for ``signed``/``split``: a negative-advantage fork whose token
            probability under the policy is already below this gets no more push-down.
            The paper's form has no floor and the loss runs to -inf; this bounds it below
            by -max|A| * log(1 / floor).
        hinge_margin: the margin of ``hinge`` in nats.

    Returns:
        The () loss and its statistics: a dict of () fp32 tensors, detached, with the
        keys of :data:`LOSS_STATS`. They stay on the loss's device, so reading them costs
        no host sync until a caller asks (:func:`stats_to_floats` does it in one).
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
        fork_term = masked_mean(adv * nll, pos_forks)
    elif variant == "split":
        # Floored negatives stay in the count (as in ``signed``): flooring one fork must
        # not raise the push-down on the others.
        neg_sum = torch.where(active_neg, adv * nll, torch.zeros_like(nll)).sum()
        fork_term = masked_mean(adv * nll, pos_forks) + neg_sum / neg_forks.sum().clamp_min(1)
    else:  # hinge
        log_ratio = policy_logp - base_logp.float()
        hinge = torch.relu(hinge_margin - torch.sign(adv) * log_ratio) * adv.abs()
        fork_term = masked_mean(hinge, forks)

    kl_term = masked_mean(kl, nonforks)
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


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """() tensors to Python floats with one device sync (not one per statistic)."""
    if not stats:
        return {}
    return dict(zip(stats, torch.stack([v.detach().float().reshape(()) for v in stats.values()]).tolist()))

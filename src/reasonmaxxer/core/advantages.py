"""Group-relative advantages: how much better a rollout did than its problem's other rollouts."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, clip: float, eps: float = 1e-6) -> torch.Tensor:
    """A_i = clip((r_i - mean r) / std r, +-clip) within one problem's rollouts.

    Args:
        rewards: (G,) rewards of one problem's G rollouts.

    Returns:
        (G,) advantages; all zeros when every reward is equal (nothing to contrast).
        std is the population standard deviation, so for 0/1 rewards with pass rate p
        the advantages are +-sqrt((1 - p) / p) and +-sqrt(p / (1 - p)) before clipping.
    """
    r = rewards.float()
    std = r.std(unbiased=False)
    if std < eps:
        return torch.zeros_like(r)
    return ((r - r.mean()) / std).clamp(-clip, clip)

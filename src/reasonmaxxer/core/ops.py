"""Small tensor helpers the rest of ``core`` shares.

Shapes: ``...`` any leading dimensions, V vocabulary, N a flat set of positions.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
"""ln 2: nats per bit, and the upper bound of the Jensen–Shannon divergence in nats."""


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (not nan) on an empty mask; keeps the graph.

    Args:
        values: (...) any float tensor.
        mask: (...) bool or 0/1, the same shape.

    Returns:
        () the mean, in ``values``' dtype.
    """
    # where, not multiply: an inf/nan outside the mask (padding) must not leak in as 0 * inf.
    picked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp_min(1).to(values.dtype)


def expectation(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_v p_v * values_v over the last axis, with terms where p_v == 0 counted as 0.

    0 * inf would be nan: a token a distribution rules out (p = 0, log p = -inf) must
    contribute nothing. Consumes ``values`` (multiplied in place), so a caller that
    still needs it passes a copy; no other (..., V) buffer is allocated.

    Args:
        p: (..., V) probabilities.
        values: (..., V) per-token values (overwritten).

    Returns:
        (...) the expectation.
    """
    values.mul_(p)
    values.masked_fill_(p == 0, 0.0)
    return values.sum(-1)


def linear_quantiles(sorted_values: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles (``torch.quantile``'s default) of an ascending 1-D tensor.

    No size limit (``torch.quantile`` refuses more than 16M elements). The rank
    ``q * (N - 1)`` is computed in float64, so ties at a cut resolve by the exact rank.

    Args:
        sorted_values: (N,) ascending, N >= 1.
        qs: (Q,) quantile levels in [0, 1].

    Returns:
        (Q,) in ``sorted_values``' dtype.
    """
    n = sorted_values.numel()
    pos = qs.to(torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(torch.float64)).to(sorted_values.dtype)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The linear-interpolation ``q`` quantile of any number of values, as a () fp32 tensor.

    Args:
        values: (N,) N >= 1, any order.
    """
    sorted_values, _ = torch.sort(values.reshape(-1).float())
    return linear_quantiles(sorted_values, torch.tensor([q], dtype=torch.float64, device=values.device))[0]

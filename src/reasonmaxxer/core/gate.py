"""The fork gate: which completion positions get the contrastive gradient.

This is the central idea of the method: a position is a decision fork when the base
model is uncertain there. Every mode below is a pure function of per-position entropy
and the completion mask. Shapes: B batch, C completion positions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ops import linear_quantile
from .options import GATE_MODES, REFERENCE_MODES, GateMode, ReferenceMode  # noqa: F401 (re-exported)


def quantile_threshold(
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    quantile: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The entropy value above which the top ``quantile`` of completion tokens lie.

    The (1 - quantile) linear-interpolation quantile of the completion tokens'
    entropies, pooled across processes by ``gather`` (a function from this process's 1-D
    tensor to the concatenation over all processes); the gate keeps entropy >= the cut.

    Tie rule: the rank (1 - quantile) * (N - 1) is computed in float64
    (:func:`~reasonmaxxer.core.ops.linear_quantiles`), so a rank that is an integer m
    lands exactly on the m-th smallest value and that token (and every token tied with
    it) is a fork. This is TRL's ``GRPOTrainer.get_high_entropy_mask``
    (``top_entropy_quantile = quantile``) up to one rounding: TRL calls
    ``torch.quantile(entropies.float(), 1 - quantile)``, which in torch 2.13 forms the
    rank in float32, and a rank rounded just above m puts the cut a little above the m-th
    value, so TRL leaves out one token (and its ties) that this gate keeps (e.g. quantile
    0.28 over 76 distinct entropies: 22 forks here, 21 with torch 2.13's quantile, 22 with
    torch 2.14's; see tests/test_entropy.py).

    Args:
        entropy: (B, C) per-position entropy.
        completion_mask: (B, C) 1 at completion tokens.

    Returns:
        () the cut, or None when no process has a completion token.
    """
    local = entropy[completion_mask.bool()].float()
    pooled = gather(local) if gather is not None else local
    if pooled.numel() == 0:
        return None
    return linear_quantile(pooled, 1.0 - quantile)


def fork_mask(
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: GateMode,
    tau: float | None = None,
    quantile: float | None = None,
    k: int | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: ReferenceMode = "threshold",
    generator: torch.Generator | None = None,
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    positive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which completion positions are decision forks.

    Args:
        entropy: (B, C) per-position entropy (nats).
        completion_mask: (B, C) 1 at completion tokens, 0 at prompt and padding.
        mode: ``threshold`` (entropy > tau), ``quantile`` (top ``quantile`` fraction of
            the batch's completion tokens, ties at the cut included, as TRL does),
            ``topk`` (the k highest-entropy completion positions of each sequence),
            ``all`` (every completion position: the dense control), ``random`` (the
            control: as many uniformly drawn completion positions per sequence as the
            ``reference`` gate picks there).
        gather: for ``quantile`` across processes, see :func:`quantile_threshold`.
        reference: for ``random``, the entropy gate whose per-sequence counts it matches.
        generator: for ``random``, the source of randomness (seed it for reproducibility).
        tau_pos: for ``threshold`` (and a ``random`` that matches it): the threshold of
            correct (``positive``) rows; None means ``tau``.
        tau_neg: the same for the other rows.
        positive: (B,) bool, which rows are correct rollouts (advantage > 0); needed
            when tau_pos or tau_neg differs from tau.

    Returns:
        (B, C) bool, never true where ``completion_mask`` is 0. A NaN entropy is never a
        fork (callers stop before a NaN entropy reaches the gate).
    """
    valid = completion_mask.bool()
    if mode == "threshold":
        cut = row_thresholds(tau, tau_pos, tau_neg, positive)
        if cut is None:
            raise ValueError("fork_mask(mode='threshold') needs tau")
        if isinstance(cut, torch.Tensor):
            cut = cut.to(entropy.device, torch.float32).unsqueeze(-1)
        return (entropy > cut) & valid
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
        idx = masked.topk(min(k, entropy.shape[-1]), dim=-1).indices
        picked = torch.zeros_like(valid).scatter(-1, idx, True)
        # A sequence with fewer than k completion tokens picks some -inf slots: drop them.
        return picked & valid
    if mode == "all":
        return valid.clone()
    if mode == "random":
        if reference not in REFERENCE_MODES:
            raise ValueError(f"fork_mask(mode='random') needs reference in {REFERENCE_MODES}, got {reference!r}")
        matched = fork_mask(entropy, completion_mask, mode=reference, tau=tau, quantile=quantile, k=k, gather=gather,
                            tau_pos=tau_pos, tau_neg=tau_neg, positive=positive)
        return random_positions(matched.sum(-1), valid, generator)
    raise ValueError(f"unknown gate mode {mode!r}; expected one of {GATE_MODES}")


def row_thresholds(tau: float | None, tau_pos: float | None, tau_neg: float | None,
                   positive: torch.Tensor | None) -> float | torch.Tensor | None:
    """The threshold gate's cut: one float, or (B,) per row when correct and wrong rows differ.

    Args:
        positive: (B,) bool, the correct rows; required when the two cuts differ.

    Returns:
        ``tau`` when tau_pos and tau_neg are unset or equal to it, else a (B,) fp32
        tensor (tau_pos on correct rows, tau_neg on the others); None when no tau is known.
    """
    hi = tau if tau_pos is None else tau_pos
    lo = tau if tau_neg is None else tau_neg
    if hi is None or lo is None:
        return None
    if hi == lo:
        return hi
    if positive is None:
        raise ValueError("fork_mask: tau_pos/tau_neg differ, so the per-row `positive` (B,) is needed")
    pos = positive.bool()
    return torch.where(pos, torch.full(pos.shape, float(hi)), torch.full(pos.shape, float(lo)))


def random_positions(counts: torch.Tensor, completion_mask: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """counts[b] completion positions of row b, drawn uniformly without replacement.

    Args:
        counts: (B,) how many positions per row (at most the row's completion length).
        completion_mask: (B, C) the positions that may be drawn.

    Returns:
        (B, C) bool with exactly counts[b] True in row b, all inside ``completion_mask``.
    """
    valid = completion_mask.bool()
    keys = torch.rand(valid.shape, generator=generator).to(valid.device)
    keys = keys.masked_fill(~valid, -1.0)  # positions that may not be drawn sort last
    order = keys.argsort(dim=-1, descending=True)
    rank = order.argsort(dim=-1)  # rank of each position in its row's random order
    return (rank < counts.unsqueeze(-1)) & valid


def gate_mask(gate: Any, entropy: torch.Tensor, completion_mask: torch.Tensor, *,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
              generator: torch.Generator | None = None,
              positive: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fork_mask` with the settings of a gate config (its mode, tau, tau_pos, tau_neg,
    quantile, k, reference).

    Args:
        gate: any object with those attributes (the ``gate`` config section; tau_pos and
            tau_neg may be absent).
        entropy: (B, C), as in :func:`fork_mask`.
        completion_mask: (B, C), as in :func:`fork_mask`.
        positive: (B,) bool, the correct rows (advantage > 0), for tau_pos/tau_neg.

    Returns:
        (B, C) bool.
    """
    return fork_mask(entropy, completion_mask, mode=gate.mode, tau=gate.tau, quantile=gate.quantile, k=gate.k,
                     reference=gate.reference, gather=gather, generator=generator,
                     tau_pos=getattr(gate, "tau_pos", None), tau_neg=getattr(gate, "tau_neg", None),
                     positive=positive)

"""Log-probs of chosen tokens (and the full KL to the base) without a (B, C, V) log-softmax.

The naive equivalent of :func:`policy_logprobs` is::

    logp = torch.gather(logits.log_softmax(-1), -1, target_ids.unsqueeze(-1)).squeeze(-1)

which keeps a second (B, C, V) tensor alive for the backward. Here the forward runs the
logsumexp over chunks of positions in fp32, and the backward writes the whole gradient
into one (B, C, V) tensor, as a fused cross-entropy does (TRL's
``selective_log_softmax`` is the same idea without the fused KL). The training step goes
one further and never holds the logits at all: :mod:`reasonmaxxer.core.fused_head`.

Shapes: B batch, C completion positions, V vocabulary, K extra token ids per position
(the cached base top-k), N = B * C flattened rows.
"""

from __future__ import annotations

from typing import Any

import torch


def gather_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, topk_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of chosen tokens: ``log_softmax(logits).gather(-1, ids)``, fused.

    Args:
        logits: (B, C, V) policy logits.
        target_ids: (B, C) sampled tokens.
        topk_ids: (B, C, K) token ids whose log-probs are also wanted (the base top-k).

    Returns:
        (B, C) log p(target) in fp32, and (B, C, K) log p(topk_ids) or None.
    """
    logp, topk_logp, _ = policy_logprobs(logits, target_ids, topk_ids)
    return logp, topk_logp


def policy_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, topk_ids: torch.Tensor | None = None,
    *, chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`gather_logprobs` plus the logsumexp.

    Args:
        logits: (B, C, V); target_ids: (B, C); topk_ids: (B, C, K) or None.
        chunk_rows: rows of the flattened (N, V) logits per chunk (default: ~16 MB of fp32).

    Returns:
        log p(target) (B, C), log p(topk_ids) (B, C, K) or None, logsumexp (B, C); all fp32.
    """
    logp, topk_logp, lse, _ = _fused(logits, target_ids, topk_ids, None, chunk_rows)
    return logp, topk_logp, lse


def policy_logprobs_and_kl(
    logits: torch.Tensor, target_ids: torch.Tensor, base_logits: torch.Tensor,
    topk_ids: torch.Tensor | None = None, *, chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`policy_logprobs` and the full-vocabulary KL(base || policy) in one pass.

    The same value as :func:`reasonmaxxer.core.kl.exact_kl`, but the base softmax lives
    one chunk of positions at a time (it is recomputed from ``base_logits`` in the
    backward) and the KL gradient, ``softmax(z) - p_base``, is added into the same
    (B, C, V) gradient tensor: no other (B, C, V) tensor is allocated.

    Args:
        logits: (B, C, V) policy logits.
        target_ids: (B, C) sampled tokens.
        base_logits: (B, C, V); takes no gradient.
        topk_ids: (B, C, K) or None.

    Returns:
        log p(target) (B, C), log p(topk_ids) (B, C, K) or None, logsumexp (B, C),
        KL (B, C); all fp32.
    """
    return _fused(logits, target_ids, topk_ids, base_logits.detach(), chunk_rows)


def _fused(logits, target_ids, topk_ids, base_logits, chunk_rows):
    ids = target_ids.unsqueeze(-1)
    if topk_ids is not None:
        ids = torch.cat([ids, topk_ids.long()], dim=-1)
    V = logits.shape[-1]
    if chunk_rows is None:
        # ~16 MB of fp32 per chunk temporary: small enough for the allocator to reuse one
        # block chunk after chunk instead of mapping fresh pages for each.
        chunk_rows = max(1, (1 << 22) // V)
    picked, lse, kl = _TokenLogprobs.apply(logits, ids, base_logits, chunk_rows)
    kl = kl if base_logits is not None else None
    return picked[..., 0], (picked[..., 1:] if topk_ids is not None else None), lse, kl


def _base_chunk(base: torch.Tensor, base_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_base, p_base > 0) of a chunk of rows: base (n, V) logits, base_lse (n,)."""
    p = torch.exp(base.float() - base_lse.unsqueeze(-1))
    return p, p > 0


class _TokenLogprobs(torch.autograd.Function):
    """(logits, ids[, base]) -> (logits[ids] - lse, lse, KL(base || softmax(logits))), memory-lean.

    With z the logits: d picked_j / dz = onehot(id_j) - softmax(z), d lse / dz = softmax(z)
    and d KL / dz = softmax(z) - p_base, so
    dz = softmax(z) * (g_lse + g_kl - sum_j g_j) + sum_j g_j onehot(id_j) - g_kl p_base.
    Everything runs over chunks of the flattened (N, V) rows.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, base: torch.Tensor | None,
                chunk_rows: int) -> tuple[torch.Tensor, ...]:
        B, C, V = logits.shape
        z, N = logits.reshape(-1, V), B * C
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
        lse = lse.view(B, C)
        picked = logits.gather(-1, ids).float() - lse.unsqueeze(-1)
        ctx.save_for_backward(logits, ids, lse, base, base_lse)
        ctx.chunk_rows = chunk_rows
        if base is None:
            ctx.mark_non_differentiable(kl)
        return picked, lse, kl.view(B, C)

    @staticmethod
    def backward(ctx: Any, g_picked: torch.Tensor | None, g_lse: torch.Tensor | None,
                 g_kl: torch.Tensor | None) -> tuple[Any, ...]:
        logits, ids, lse, base, base_lse = ctx.saved_tensors
        B, C, V = logits.shape
        N, rows_per_chunk = B * C, ctx.chunk_rows
        zeros = torch.zeros(B, C, dtype=torch.float32, device=logits.device)
        g_picked = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device) if g_picked is None else g_picked
        g_lse = zeros if g_lse is None else g_lse
        g_kl = zeros if g_kl is None or base is None else g_kl
        coef = (g_lse + g_kl - g_picked.sum(-1)).reshape(N, 1)  # the softmax's weight per row
        g_kl, lse = g_kl.reshape(N, 1), lse.reshape(N, 1)
        z = logits.reshape(N, V)
        ids_flat, g_picked = ids.reshape(N, -1), g_picked.reshape(N, -1).float()
        grad = torch.empty_like(logits)
        g = grad.view(N, V)
        for s in range(0, N, rows_per_chunk):
            rows = slice(s, s + rows_per_chunk)
            if g.dtype == torch.float32:  # write softmax * coef straight into the gradient
                chunk = torch.sub(z[rows], lse[rows], out=g[rows])
                chunk.exp_().mul_(coef[rows])
            else:  # every term in fp32, one cast at the end (see below)
                chunk = torch.exp(z[rows].float() - lse[rows]).mul_(coef[rows])
            if base is not None:
                p, _ = _base_chunk(base.reshape(N, V)[rows], base_lse[rows])
                chunk -= p.mul_(g_kl[rows])
            # The one-hot goes in before any cast: at the chosen token softmax * coef and
            # g_picked nearly cancel (g (1 - p) at p -> 1), and summed in bf16 the
            # difference rounds away (to 0 at p >= 0.999).
            chunk.scatter_add_(-1, ids_flat[rows], g_picked[rows])
            if g.dtype != torch.float32:
                g[rows] = chunk
        return grad, None, None, None

"""The LM head and the log-prob/KL/entropy statistics in one pass, without the logits.

From final hidden states and the LM head weight this computes, chunk of rows by chunk
of rows, forward *and* backward, what the training step needs; no (B, C, V) tensor ever
exists (a 4 x 8192 x 152,064 fp32 one is 20 GB). The naive equivalent of
:func:`fused_head_logprobs` is::

    logits = hidden @ weight.T + bias                              # (B, C, V)
    if softcap: logits = softcap * tanh(logits / softcap)
    logp_all = logits.float().log_softmax(-1)
    logp = logp_all.gather(-1, target_ids[..., None])[..., 0]      # (B, C)
    extra_logp = logp_all.gather(-1, extra_ids)                    # (B, C, K)
    lse = logits.float().logsumexp(-1)                             # (B, C)
    base_logp_all = head(base_hidden).float().log_softmax(-1)      # same head, no gradient
    kl = (base_logp_all.exp() * (base_logp_all - logp_all)).sum(-1)  # KL(base || policy), (B, C)
    entropy = token_entropy(logits, temperature=T)                 # (B, C), no gradient

The gradient to the states is linear in the upstream gradients, so when the head is frozen
(LoRA) the forward also forms, per chunk, the two products it needs: the softmax outside the
row's ids times the head, and (exact KL) softmax minus the base softmax times the head, each
difference formed in fp32 before one cast. The backward then takes no head matmul at all: it
combines those (N, H) products with the head rows of the ids, whose coefficients are formed
in fp32. So a gated step costs two head matmuls, as many as the forward and backward of a
plain head (four with the exact anchor: the base's logits and the KL's product; recomputing
in the backward took three and five). When the head weight or bias is trained the
backward instead recomputes each chunk's logits (as activation checkpointing would) for
``grad_weight``.

Shapes: B batch, C completion positions, H hidden size, V vocabulary, K extra token ids
per position (the cached base top-k), N = B * C flattened rows, n rows of one chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .entropy import entropy_from_logits

# fp32 logits of one chunk: large enough for the head matmul and the per-chunk kernels to run
# near full speed on a GPU (~440 rows at V = 152k; on an H200, bench/head.py at B 1 x 8192 x
# 152,064: 64 MB chunks cost 1.54x the unfused path, 256 MB chunks 1.07x), still a fifth of
# the (B, C, V) tensor it replaces at that size.
DEFAULT_CHUNK_BYTES = 256 << 20


class HeadStats(NamedTuple):
    """What :func:`fused_head_logprobs` returns; all fp32."""

    logp: torch.Tensor  # (B, C) log p(target)
    extra_logp: torch.Tensor | None  # (B, C, K) log p(extra_ids), or None without extra_ids
    lse: torch.Tensor  # (B, C) logsumexp of the (softcapped) logits
    kl: torch.Tensor | None  # (B, C) KL(base || policy), or None without base_hidden
    entropy: torch.Tensor | None  # (B, C) entropy at entropy_temperature (no gradient), or None


def chunk_rows_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's fp32 logits take about ``chunk_bytes`` (at least 1 row)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    return max(1, chunk_bytes // (4 * max(vocab_size, 1)))


def fused_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    extra_ids: torch.Tensor | None = None,
    base_hidden: torch.Tensor | None = None,
    entropy_temperature: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    factor_backward: bool = True,
) -> HeadStats:
    """Log-probs, logsumexp, KL to the base and entropy through the LM head, chunk by chunk.

    Args:
        hidden: (B, C, H) final (normed) decoder states of the policy; takes gradient.
        weight: (V, H) LM head weight; takes gradient only if it requires it.
        target_ids: (B, C) sampled tokens.
        bias: (V,) head bias or None.
        softcap: the model's ``final_logit_softcapping`` (logits = s * tanh(logits / s)), or None/0.
        extra_ids: (B, C, K) more token ids whose log-probs are wanted (K may be 0).
        base_hidden: (B, C, H) the base's final states (adapter disabled) for the exact
            KL(base || policy) through the same head; never takes gradient.
        entropy_temperature: measure the policy's entropy of softmax(logits / T) (no gradient).
        chunk_bytes: target size of one chunk's fp32 logits (see :func:`chunk_rows_for`).
        factor_backward: with a frozen head, form the backward's (N, H) products in the
            forward (no head matmul in the backward). False recomputes each chunk's logits
            in the backward instead, as a trained head does: one more head matmul per chunk,
            and no (N, H) fp32 products kept (bench/head.py compares the two).

    Returns:
        :class:`HeadStats`; gradients flow from ``logp``, ``extra_logp``, ``lse`` and
        ``kl`` into ``hidden`` (and ``weight``/``bias`` when they require them).
    """
    B, C, H = hidden.shape
    V = weight.shape[0]
    ids = target_ids.reshape(B, C, 1).long()
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids.reshape(B, C, extra_ids.shape[-1]).long()], dim=-1)
    base_flat = base_hidden.detach().reshape(B * C, H) if base_hidden is not None else None
    # needs_input_grad ignores no_grad, so whether a backward can come is decided here
    factored = factor_backward and torch.is_grad_enabled() and hidden.requires_grad
    picked, lse, kl, entropy = _FusedHead.apply(
        hidden.reshape(B * C, H), weight, bias, ids.reshape(B * C, ids.shape[-1]), base_flat,
        float(softcap) if softcap else None, entropy_temperature, chunk_rows_for(V, chunk_bytes), factored,
    )
    picked = picked.view(B, C, ids.shape[-1])
    return HeadStats(
        logp=picked[..., 0],
        extra_logp=picked[..., 1:] if extra_ids is not None else None,
        lse=lse.view(B, C),
        kl=kl.view(B, C) if base_hidden is not None else None,
        entropy=entropy.view(B, C) if entropy_temperature is not None else None,
    )


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | None) -> torch.Tensor:
    """(n, H) states -> (n, V) fp32 logits: the matmul in the model's dtype (as its own head runs), the rest fp32."""
    # States may arrive in fp32 next to a bf16 head (LoRA outputs, no autocast): the head's dtype wins.
    z = torch.nn.functional.linear(h.to(weight.dtype), weight, bias).float()
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


class _AutocastState(NamedTuple):
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device_type: str) -> _AutocastState:
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def restore(self) -> torch.autocast:
        """The forward's autocast state, so the backward recomputes the very same logits."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _FusedHead(torch.autograd.Function):
    """(hidden, W, b, ids[, base_hidden]) -> (log p(ids), lse, KL(base || policy), entropy), chunked.

    With z the (softcapped) logits of a row: d log p(id_j) / dz = onehot(id_j) - softmax(z),
    d lse / dz = softmax(z), d KL / dz = softmax(z) - p_base, so the logit gradient is
    g_z = softmax(z) * (g_lse + g_kl - sum_j g_j) + sum_j g_j onehot(id_j) - g_kl p_base,
    formed in fp32. Through the softcap, dz/du = 1 - (z / s)^2 for the raw logits u; then
    grad_hidden = g_u @ W and grad_W = g_u^T @ hidden, per chunk of rows.

    Frozen head: with c = sum_j g_j - g_lse, sc = dz/du and U the row's ids,
    grad_hidden = sum_j (g_j sc_j - c p_j sc_j / m_j) W[id_j] - c R + g_kl D, where
    R = (p sc, zero on U) @ W and D = ((p - p_base) sc) @ W come from the forward, p_j and
    sc_j are taken at id_j and m_j counts id_j in the row (a repeated id shares its p_j).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                ids: torch.Tensor, base_hidden: torch.Tensor | None, softcap: float | None,
                entropy_temperature: float | None, chunk_rows: int,
                factor_backward: bool) -> tuple[torch.Tensor, ...]:
        N, H, dev = hidden.shape[0], hidden.shape[1], hidden.device
        picked = torch.empty(ids.shape, dtype=torch.float32, device=dev)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        kl = torch.zeros(N if base_hidden is not None else 0, dtype=torch.float32, device=dev)
        base_lse = torch.empty(N if base_hidden is not None else 0, dtype=torch.float32, device=dev)
        entropy = torch.zeros(N if entropy_temperature is not None else 0, dtype=torch.float32, device=dev)
        # Frozen head (LoRA): the backward's head products are formed here, from the logits at hand.
        factored = factor_backward and not any(ctx.needs_input_grad[1:3])
        if factored:
            rest = torch.empty(N, H, dtype=torch.float32, device=dev)  # R: softmax off the ids, times W
            drift = torch.empty(N if base_hidden is not None else 0, H, dtype=torch.float32, device=dev)  # D
            p_ids = torch.empty(ids.shape, dtype=torch.float32, device=dev)  # p_j sc_j / m_j
            sc_ids = torch.empty(ids.shape if softcap is not None else (0,), dtype=torch.float32, device=dev)
        for s in range(0, N, chunk_rows):
            rows = slice(s, s + chunk_rows)
            z = _head_logits(hidden[rows], weight, bias, softcap)
            lse[rows] = chunk_lse = torch.logsumexp(z, dim=-1)
            picked[rows] = z.gather(-1, ids[rows]) - chunk_lse.unsqueeze(-1)
            if entropy_temperature is not None:
                entropy[rows] = entropy_from_logits(z / entropy_temperature if entropy_temperature != 1.0 else z)
            base_p = None
            if base_hidden is not None:
                kl[rows], base_lse[rows], base_p = _kl_chunk(z, chunk_lse, base_hidden[rows], weight, bias, softcap,
                                                             keep_base_p=factored)
            if factored:
                p = z.sub(chunk_lse.unsqueeze(-1)).exp_()  # (n, V) fp32
                sc = z.div_(softcap).square_().neg_().add_(1.0) if softcap is not None else None  # z is spent
                if base_p is not None:  # the small difference p - p_base in fp32, then one cast
                    d = base_p.neg_().add_(p)
                    drift[rows] = _times_head(d.mul_(sc) if sc is not None else d, weight)
                    del d, base_p
                row_ids = ids[rows]
                repeats = (row_ids.unsqueeze(-1) == row_ids.unsqueeze(-2)).sum(-1)  # (n, J) m_j
                p_ids[rows] = p.gather(-1, row_ids) / repeats
                if sc is not None:
                    sc_ids[rows] = sc.gather(-1, row_ids)
                    p_ids[rows] *= sc_ids[rows]
                    p.mul_(sc)
                    del sc
                rest[rows] = _times_head(p.scatter_(-1, row_ids, 0.0), weight)
                del p
            del z
        if factored:
            ctx.save_for_backward(weight, ids, rest, drift, p_ids, sc_ids)
        else:
            ctx.save_for_backward(hidden, weight, bias, ids, lse, base_hidden, base_lse)
            ctx.autocast = _AutocastState.current(dev.type)
        ctx.factored, ctx.has_base, ctx.hidden_dtype = factored, base_hidden is not None, hidden.dtype
        ctx.softcap, ctx.chunk_rows = softcap, chunk_rows
        # One call: each call replaces the set the last one marked.
        ctx.mark_non_differentiable(*([entropy] if base_hidden is not None else [entropy, kl]))
        return picked, lse, kl, entropy

    @staticmethod
    def backward(ctx: Any, g_picked: torch.Tensor | None, g_lse: torch.Tensor | None,
                 g_kl: torch.Tensor | None, _g_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        if ctx.factored:
            return (_FusedHead._factored_grad_hidden(ctx, g_picked, g_lse, g_kl),
                    None, None, None, None, None, None, None, None)
        hidden, weight, bias, ids, lse, base_hidden, base_lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        N, dev = hidden.shape[0], hidden.device
        zeros = torch.zeros(N, dtype=torch.float32, device=dev)
        g_picked = torch.zeros(ids.shape, dtype=torch.float32, device=dev) if g_picked is None else g_picked.float()
        g_lse = zeros if g_lse is None else g_lse.float()
        g_kl = zeros if g_kl is None or base_hidden is None else g_kl.float()
        coef = (g_lse + g_kl - g_picked.sum(-1)).unsqueeze(-1)  # (N, 1): the softmax's weight per row
        g_kl, lse = g_kl.unsqueeze(-1), lse.unsqueeze(-1)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_bias else None
        softcap, chunk_rows = ctx.softcap, ctx.chunk_rows
        for s in range(0, N, chunk_rows):
            rows = slice(s, s + chunk_rows)
            with ctx.autocast.restore():
                z = _head_logits(hidden[rows], weight, bias, softcap)
            g = (z - lse[rows]).exp_().mul_(coef[rows])  # fp32 (n, V) from here to the one cast below
            if base_hidden is not None:
                with ctx.autocast.restore():
                    base_z = _head_logits(base_hidden[rows], weight, bias, softcap)
                g -= base_z.sub_(base_lse[rows].unsqueeze(-1)).exp_().mul_(g_kl[rows])
                del base_z
            g.scatter_add_(-1, ids[rows], g_picked[rows])
            if softcap is not None:  # d(s tanh(u/s))/du = 1 - (z/s)^2
                g.mul_(z.div_(softcap).square_().neg_().add_(1.0))
            del z
            if grad_hidden is not None:
                with ctx.autocast.restore():
                    grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias += g.sum(0)
        return (grad_hidden,
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None,
                None, None, None, None, None, None)

    @staticmethod
    def _factored_grad_hidden(ctx: Any, g_picked: torch.Tensor | None, g_lse: torch.Tensor | None,
                              g_kl: torch.Tensor | None) -> torch.Tensor:
        """grad_hidden from the forward's products: no head matmul, only the ids' rows of W."""
        weight, ids, rest, drift, p_ids, sc_ids = ctx.saved_tensors
        N, J, H = ids.shape[0], ids.shape[1], rest.shape[1]
        g_picked = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device) if g_picked is None \
            else g_picked.float()
        c = g_picked.sum(-1) - (g_lse.float() if g_lse is not None else 0.0)  # (N,)
        grad = rest * -c.unsqueeze(-1)  # not in place: the saved tensors stay as they were
        if ctx.has_base and g_kl is not None:
            grad.addcmul_(drift, g_kl.float().unsqueeze(-1))
        # per id: g_j sc_j - c p_j sc_j / m_j, in fp32 (where the two nearly cancel), then the rows of W
        coef = (g_picked * sc_ids if sc_ids.numel() else g_picked).sub_(p_ids * c.unsqueeze(-1))
        step = max(1, (64 << 20) // max(1, J * H * weight.element_size()))  # rows per (n, J, H) gather
        for s in range(0, N, step):
            rows = slice(s, s + step)
            w_rows = weight[ids[rows]]  # (n, J, H)
            grad[rows] += torch.bmm(coef[rows].unsqueeze(1).to(w_rows.dtype), w_rows).squeeze(1).float()
        return grad.to(ctx.hidden_dtype)


def _times_head(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, V) fp32 weights over the vocabulary -> (n, H) fp32: one cast to the head's dtype, one matmul."""
    return (p.to(weight.dtype) @ weight).float()


def _kl_chunk(z: torch.Tensor, lse: torch.Tensor, base_h: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, softcap: float | None,
              keep_base_p: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """KL(base || policy) (n,), the base logsumexp (n,) and, with ``keep_base_p``, the base softmax (n, V).

    KL = sum_v p (log p - z) + lse(z), p the base softmax; where p = 0 the term is 0 even
    if z or log p is -inf.
    """
    base_z = _head_logits(base_h, weight, bias, softcap)
    base_lse = torch.logsumexp(base_z, dim=-1)
    base_logp = base_z.sub_(base_lse.unsqueeze(-1))
    p = base_logp.exp()
    term = base_logp.sub_(z).mul_(p).masked_fill_(p == 0, 0.0)
    return term.sum(-1) + lse, base_lse, (p if keep_base_p else None)

"""reasonmaxxer.core.fused_head against the naive head + log-softmax, and against the unfused logits path."""

from __future__ import annotations

import pytest
import torch

from reasonmaxxer.core.fused_head import chunk_rows_for, fused_head_logprobs
from reasonmaxxer.core.logprobs import policy_logprobs, policy_logprobs_and_kl


def _problem(B=3, C=5, H=8, V=19, K=4, dtype=torch.float32, seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, C, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * logit_scale / H**0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    base_hidden = hidden + 0.5 * torch.randn(B, C, H, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, C), generator=g)
    extra = torch.randint(0, V, (B, C, K), generator=g)
    if K:
        extra[0, 0, 0] = targets[0, 0]  # an extra id equal to the target: both gradients add up
    upstream = {name: torch.randn(shape, generator=g, dtype=torch.float64)
                for name, shape in (("logp", (B, C)), ("extra", (B, C, K)), ("lse", (B, C)), ("kl", (B, C)))}
    return hidden, weight, bias, base_hidden, targets, extra, upstream


def _naive(hidden, weight, bias, base_hidden, targets, extra, softcap, temperature):
    """The docstring's naive equivalent, in float64 with full (B, C, V) tensors."""
    def head(h, weight, bias):
        z = torch.nn.functional.linear(h.double(), weight.double(), None if bias is None else bias.double())
        return softcap * torch.tanh(z / softcap) if softcap else z

    logits = head(hidden, weight, bias)
    logp_all = logits.log_softmax(-1)
    out = {"logp": logp_all.gather(-1, targets[..., None])[..., 0], "lse": logits.logsumexp(-1)}
    if extra is not None:
        out["extra"] = logp_all.gather(-1, extra)
    if base_hidden is not None:
        # The base distribution is a constant: no gradient through its logits, to the head weight neither.
        base_logp = head(base_hidden, weight.detach(), None if bias is None else bias.detach()).log_softmax(-1)
        out["kl"] = (base_logp.exp() * (base_logp - logp_all)).sum(-1)
    if temperature is not None:
        logp_t = (logits.detach() / temperature).log_softmax(-1)
        out["entropy"] = -(logp_t.exp() * logp_t).sum(-1)
    return out


def _fused(hidden, weight, bias, base_hidden, targets, extra, softcap, temperature, chunk_bytes, factor=True):
    s = fused_head_logprobs(hidden, weight, targets, bias=bias, softcap=softcap, extra_ids=extra,
                            base_hidden=base_hidden, entropy_temperature=temperature, chunk_bytes=chunk_bytes,
                            factor_backward=factor)
    out = {"logp": s.logp, "lse": s.lse}
    for key, value in (("extra", s.extra_logp), ("kl", s.kl), ("entropy", s.entropy)):
        if value is not None:
            out[key] = value
    return out


def _backward(out, upstream):
    loss = sum((out[k].double() * upstream[k]).sum() for k in upstream if k in out)
    loss.backward()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 19, 1 << 26])  # 1 row, 3 rows (ragged end), one chunk
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("K", [0, 4])
# frozen head: the factored backward, or the recompute asked for; trained head: always the recompute
@pytest.mark.parametrize("backward", ["factored", "recomputed", "head_trained"])
def test_values_and_gradients_match_the_naive_head(chunk_bytes, softcap, with_base, K, backward):
    hidden, weight, bias, base_hidden, targets, extra, upstream = _problem(K=K, logit_scale=4.0)
    base_hidden = base_hidden if with_base else None
    h, w, b = _leaves(hidden, weight, bias)
    rh, rw, rb = _leaves(hidden, weight, bias)
    head_trained = backward == "head_trained"
    if not head_trained:
        w, b, rw, rb = (t.detach() for t in (w, b, rw, rb))
    fused = _fused(h, w, b, base_hidden, targets, extra, softcap, 0.7, chunk_bytes, factor=backward == "factored")
    ref = _naive(rh, rw, rb, base_hidden, targets, extra, softcap, 0.7)
    assert fused.keys() == ref.keys()
    for key in ref:
        assert fused[key].dtype == torch.float32, key
        torch.testing.assert_close(fused[key].double(), ref[key].detach(), atol=1e-5, rtol=1e-5, msg=key)
    assert fused["extra"].shape == (3, 5, K) and not fused["entropy"].requires_grad
    _backward(fused, upstream)
    _backward(ref, upstream)
    for got, want in ((h, rh), (w, rw), (b, rb)) if head_trained else ((h, rh),):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_base", [False, True])
def test_a_frozen_heads_backward_takes_no_head_matmul(monkeypatch, with_base):
    """The forward forms the products the backward needs; a trained head, or factor_backward=False, recomputes."""
    import reasonmaxxer.core.fused_head as fused_head

    calls = []
    real = fused_head._head_logits
    monkeypatch.setattr(fused_head, "_head_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, base_hidden, targets, extra, upstream = _problem(logit_scale=3.0)
    chunks = 3  # 15 rows, 6 per chunk
    for trained, factor in ((False, True), (False, False), (True, True)):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(trained)
        stats = fused_head_logprobs(h, w, targets, extra_ids=extra, base_hidden=base_hidden if with_base else None,
                                    chunk_bytes=6 * 4 * 19, factor_backward=factor)
        calls.clear()
        (stats.logp.sum() + stats.extra_logp.sum() + (stats.kl.sum() if with_base else 0)).backward()
        assert len(calls) == (0 if factor and not trained else chunks * (1 + with_base)), (trained, factor)


def test_no_grad_passes_form_no_backward_products(monkeypatch):
    """Scoring and the movement pass run under no_grad: the forward does only the statistics' work."""
    import reasonmaxxer.core.fused_head as fused_head

    calls = []
    real = fused_head._times_head
    monkeypatch.setattr(fused_head, "_times_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, base_hidden, targets, extra, _ = _problem()
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        fused_head_logprobs(h, weight, targets, extra_ids=extra, base_hidden=base_hidden)
    assert calls == []
    fused_head_logprobs(h, weight, targets, extra_ids=extra, base_hidden=base_hidden)
    assert len(calls) == 2  # one chunk: R and D


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient():
    hidden, weight, bias, base_hidden, targets, extra, upstream = _problem(logit_scale=3.0)
    h = hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, bias=bias, extra_ids=extra, base_hidden=base_hidden,
                                chunk_bytes=4 * 4 * 19)
    loss = (stats.logp * upstream["logp"].float()).sum() + (stats.kl * upstream["kl"].float()).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward()
    torch.testing.assert_close(h.grad, first, atol=0, rtol=0)


@pytest.mark.parametrize("anchor", ["cached", "exact"])
def test_matches_the_unfused_logits_path(anchor):
    """The same values and hidden-state gradients as the LM head followed by core.logprobs on full logits."""
    hidden, weight, bias, base_hidden, targets, extra, upstream = _problem(B=2, C=7, V=23, seed=3, logit_scale=3.0)
    h = hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, bias=bias, extra_ids=extra if anchor == "cached" else None,
                                base_hidden=base_hidden if anchor == "exact" else None, chunk_bytes=4 * 23 * 4)
    second = stats.extra_logp if anchor == "cached" else stats.kl
    ((stats.logp * upstream["logp"]).sum() + (second.double() * upstream["extra" if anchor == "cached" else "kl"])
     .sum()).backward()

    ref_h = hidden.clone().requires_grad_()
    logits = torch.nn.functional.linear(ref_h, weight, bias)
    if anchor == "cached":
        logp, ref_second, _ = policy_logprobs(logits, targets, extra)
    else:
        logp, _, _, ref_second = policy_logprobs_and_kl(logits, targets, torch.nn.functional.linear(base_hidden,
                                                                                                   weight, bias))
    ((logp * upstream["logp"]).sum() + (ref_second.double() * upstream["extra" if anchor == "cached" else "kl"])
     .sum()).backward()
    torch.testing.assert_close(stats.logp, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, ref_second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, ref_h.grad, atol=1e-5, rtol=1e-5)


def test_one_token_completions_and_padding_rows():
    """C = 1 works; rows whose statistics the loss ignores get exactly zero gradient."""
    hidden, weight, bias, base_hidden, targets, extra, _ = _problem(B=4, C=1)
    h = hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, bias=bias, extra_ids=extra, base_hidden=base_hidden,
                                chunk_bytes=2 * 4 * 19)
    assert stats.logp.shape == stats.kl.shape == (4, 1) and stats.extra_logp.shape == (4, 1, 4)
    mask = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    ((stats.logp + stats.kl + stats.extra_logp.sum(-1)) * mask).sum().backward()
    assert torch.count_nonzero(h.grad[mask[:, 0] == 0]) == 0
    assert torch.count_nonzero(h.grad[mask[:, 0] == 1]) > 0


def test_empty_completion_and_no_gradient_to_a_frozen_head_or_the_base():
    hidden, weight, bias, base_hidden, targets, _, _ = _problem()
    empty = fused_head_logprobs(hidden[:, :0], weight, targets[:, :0], base_hidden=base_hidden[:, :0])
    assert empty.logp.shape == empty.kl.shape == (3, 0)
    h = hidden.clone().requires_grad_()
    base = base_hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, bias=bias, base_hidden=base)
    (stats.logp.sum() + stats.kl.sum()).backward()
    assert base.grad is None and not weight.requires_grad and h.grad is not None


def test_kl_is_zero_when_the_policy_is_the_base():
    hidden, weight, bias, _, targets, _, _ = _problem(logit_scale=5.0)
    stats = fused_head_logprobs(hidden, weight, targets, bias=bias, base_hidden=hidden)
    assert stats.kl.abs().max() < 1e-5


def _drift_problem(V=4099, H=64, N=24, drift=0.01, seed=0, scale=1.0):
    """bf16 states whose policy and base logits (std ~``scale``) differ by ~``drift``: the KL gradient is a
    small difference.

    Rounding softmax(z) and p_base to bf16 apart before subtracting (the old backward) is ~20% off here.
    """
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) * scale / H**0.5).bfloat16()
    base_hidden = torch.randn(1, N, H, generator=g).bfloat16()
    hidden = (base_hidden.float() + drift * torch.randn(1, N, H, generator=g)).bfloat16()
    targets = torch.randint(0, V, (1, N), generator=g)
    return hidden, weight, base_hidden, targets


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def test_bf16_kl_gradient_is_formed_in_fp32_then_cast_once():
    """At logit drift 0.01 the KL gradient softmax(z) - p_base nearly cancels; rounding each part to bf16 loses it."""
    hidden, weight, base_hidden, targets = _drift_problem()
    h = hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, base_hidden=base_hidden, chunk_bytes=1 << 16)
    stats.kl.sum().backward()
    assert h.grad.dtype == torch.bfloat16
    # Reference: float64 on the very same bf16 logits, then the float64 chain rule through the head.
    z = torch.nn.functional.linear(hidden, weight).double().requires_grad_()
    base_z = torch.nn.functional.linear(base_hidden, weight).double()
    base_logp = base_z.log_softmax(-1)
    (base_logp.exp() * (base_logp - z.log_softmax(-1))).sum().backward()
    want = z.grad @ weight.double()
    assert _rel_err(h.grad, want) < 1e-2


def test_bf16_cached_kl_gradient_cancels_in_fp32():
    """The cached top-k KL pulls the policy toward p_base at the ids: where the top 64 hold most of the mass
    (98% at logit std 5) its gradient (sum_k p_k) softmax - p_base nearly cancels. Forming softmax @ W over
    the whole vocabulary in bf16 and the ids' rows apart is 8% off here; the ids' coefficients are fp32."""
    hidden, weight, base_hidden, targets = _drift_problem(scale=5.0)
    base_z = torch.nn.functional.linear(base_hidden, weight).float()
    base_logp_top, top_ids = base_z.log_softmax(-1).topk(64, dim=-1)  # (1, N, 64)
    h = hidden.clone().requires_grad_()
    stats = fused_head_logprobs(h, weight, targets, extra_ids=top_ids, chunk_bytes=1 << 16)
    # the cached anchor's KL over the top-k: sum_k p_k (log p_k - log q_k)
    (base_logp_top.exp() * (base_logp_top - stats.extra_logp)).sum().backward()
    z = torch.nn.functional.linear(hidden, weight).double().requires_grad_()
    top = base_logp_top.double()
    (top.exp() * (top - z.log_softmax(-1).gather(-1, top_ids))).sum().backward()
    want = z.grad @ weight.double()
    assert _rel_err(h.grad, want) < 1e-2


def test_bf16_logits_path_forms_the_kl_gradient_in_fp32_too():
    """core.logprobs' backward on bf16 logits: softmax * coef - p_base * g_kl in fp32, one cast."""
    hidden, weight, base_hidden, targets = _drift_problem()
    z = torch.nn.functional.linear(hidden, weight).requires_grad_()
    base_z = torch.nn.functional.linear(base_hidden, weight)
    _, _, _, kl = policy_logprobs_and_kl(z, targets, base_z, chunk_rows=5)
    kl.sum().backward()
    ref = z.detach().double().requires_grad_()
    base_logp = base_z.double().log_softmax(-1)
    (base_logp.exp() * (base_logp - ref.log_softmax(-1))).sum().backward()
    assert _rel_err(z.grad, ref.grad) < 1e-2


def test_autocast_backward_matches_the_bf16_logits():
    """Under bf16 autocast (fp32 weights) the head matmuls run in bf16, the forward's products included."""
    hidden, weight, bias, base_hidden, targets, extra, upstream = _problem(H=16, V=64, logit_scale=3.0)
    h = hidden.clone().requires_grad_()
    rh = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = fused_head_logprobs(h, weight, targets, bias=bias, base_hidden=base_hidden, chunk_bytes=2 * 4 * 64)
        logits = torch.nn.functional.linear(rh, weight, bias)
        base_logits = torch.nn.functional.linear(base_hidden, weight, bias)
    logp_all = logits.float().log_softmax(-1)
    base_logp = base_logits.float().log_softmax(-1)
    ref_kl = (base_logp.exp() * (base_logp - logp_all)).sum(-1)
    torch.testing.assert_close(stats.kl, ref_kl, atol=1e-5, rtol=1e-5)  # the same bf16 logits
    (stats.kl * upstream["kl"].float()).sum().backward()
    (ref_kl * upstream["kl"].float()).sum().backward()
    assert h.grad.dtype == torch.float32
    assert _rel_err(h.grad, rh.grad.double()) < 2e-2  # both take a bf16 matmul for grad_hidden


def test_chunk_rows_for():
    assert chunk_rows_for(152_064, 64 << 20) == 110  # ~64 MB of fp32 logits at a Qwen-sized vocabulary
    assert chunk_rows_for(152_064, 16 << 20) == 27
    assert chunk_rows_for(10**9, 1 << 20) == 1
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunk_rows_for(100, 0)


def test_fp32_states_with_a_bf16_head_run_without_autocast():
    """LoRA can hand fp32 states to a bf16 head with no autocast on (seen on CUDA in bench/gpu.py's e2e)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 16, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 40, (2, 3))
    stats = fused_head_logprobs(hidden, weight, targets)
    stats.logp.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()
    reference = torch.log_softmax((hidden.detach().to(torch.bfloat16) @ weight.T).float(), -1)
    assert torch.allclose(stats.logp, reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1), atol=1e-5)

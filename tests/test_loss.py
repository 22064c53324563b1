"""Tests for reasonmaxxer.core (logprobs, kl, loss) against independent computations.

References: log_softmax + gather, torch.distributions.kl_divergence, float64 brute-force
loops over positions and vocabulary, and a per-position Python re-implementation of the
fork-gated loss written from its docstring.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from reasonmaxxer.core.kl import exact_kl, topk_kl
from reasonmaxxer.core.logprobs import gather_logprobs
from reasonmaxxer.core.loss import LOSS_STATS, LOSS_VARIANTS, fork_gated_loss, stats_to_floats


def _gated_loss(*args, **kwargs):
    """fork_gated_loss with its tensor statistics read as floats (one sync)."""
    loss, stats = fork_gated_loss(*args, **kwargs)
    return loss, stats_to_floats(stats)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- gather_logprobs


def test_gather_logprobs_matches_log_softmax_gather_fp32():
    B, T, V, K = 3, 4, 19, 5
    logits = torch.randn(B, T, V, generator=_gen(0)) * 3
    targets = torch.randint(0, V, (B, T), generator=_gen(1))
    ids = torch.randint(0, V, (B, T, K), generator=_gen(2))
    logp, topk = gather_logprobs(logits, targets, ids)
    ref_all = torch.log_softmax(logits, -1)
    assert logp.dtype == torch.float32 and topk.dtype == torch.float32
    torch.testing.assert_close(logp, ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(topk, ref_all.gather(-1, ids))
    # brute force, one position at a time, float64
    for b in range(B):
        for t in range(T):
            row = logits[b, t].double().tolist()
            lse = math.log(sum(math.exp(x) for x in row))
            assert logp[b, t].item() == pytest.approx(row[targets[b, t]] - lse, abs=1e-5)
            for j in range(K):
                assert topk[b, t, j].item() == pytest.approx(row[ids[b, t, j]] - lse, abs=1e-5)
    # no topk_ids: None
    assert gather_logprobs(logits, targets)[1] is None


def test_gather_logprobs_bf16_logits():
    logits = torch.randn(2, 5, 64, generator=_gen(3)) * 3
    targets = torch.randint(0, 64, (2, 5), generator=_gen(4))
    ids = torch.randint(0, 64, (2, 5, 7), generator=_gen(5))
    logp, topk = gather_logprobs(logits.bfloat16(), targets, ids)
    assert logp.dtype == torch.float32 and topk.dtype == torch.float32
    ref_all = torch.log_softmax(logits.bfloat16().float(), -1)
    # the same as fp32 maths on the bf16 values ...
    torch.testing.assert_close(logp, ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(topk, ref_all.gather(-1, ids))
    # ... and within bf16 rounding of the fp32 logits
    ref32 = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, ref32, atol=5e-2, rtol=1e-2)


def _logits_with_chosen_probability(p: float, V: int = 48, dtype=torch.bfloat16, seed: int = 0):
    """(1, R, V) logits (in ``dtype``) whose token 0 has probability ~p; the rest share 1 - p unevenly."""
    rest = torch.randn(1, 16, V - 1, generator=_gen(seed))
    rest = rest - torch.logsumexp(rest, -1, keepdim=True) + math.log1p(-p)
    chosen = torch.full((1, 16, 1), math.log(p))
    return torch.cat([chosen, rest], -1).to(dtype)


@pytest.mark.parametrize("p", [0.5, 0.99, 0.999, 1 - 1e-6])
@pytest.mark.parametrize("with_base", [False, True])
def test_logprob_gradient_in_bf16_matches_float64(p, with_base):
    """The gradient of a bf16 head's log-probs (and KL) is the float64 one, rounded once.

    d log p(y) / dz = onehot(y) - softmax(z): at the chosen token that is 1 - p, a
    difference of two numbers near 1. Summed in bf16 it is wrong by 17-29% at p ~ 0.99 and
    by 100% at p >= 0.999 (rounds to 0). The reference is float64 autograd on the same
    bf16 values. Allowed: one rounding to bf16 (2^-8 relative) plus the fp32 softmax's own
    rounding before the subtraction (a few fp32 ulps of the row's coefficient, 1e-6 here).
    """
    from reasonmaxxer.core.logprobs import policy_logprobs_and_kl

    logits = _logits_with_chosen_probability(p).requires_grad_(True)
    target = torch.zeros(1, 16, dtype=torch.long)
    topk = torch.randint(0, 48, (1, 16, 3), generator=_gen(5))
    base = _logits_with_chosen_probability(min(p, 0.9), seed=1)
    g_lp, g_top = torch.randn(1, 16, generator=_gen(6)), torch.randn(1, 16, 3, generator=_gen(7))
    g_kl = torch.rand(1, 16, generator=_gen(8))

    ref_logits = logits.detach().double().requires_grad_(True)
    ref_all = torch.log_softmax(ref_logits, -1)
    ref_obj = (ref_all[..., 0] * g_lp).sum() + (ref_all.gather(-1, topk) * g_top).sum()
    if with_base:
        lp, top, _, kl = policy_logprobs_and_kl(logits, target, base, topk)
        ref_kl = (torch.softmax(base.double(), -1) * (torch.log_softmax(base.double(), -1) - ref_all)).sum(-1)
        ref_obj = ref_obj + (ref_kl * g_kl).sum()
        obj = (lp * g_lp).sum() + (top * g_top).sum() + (kl * g_kl).sum()
    else:
        lp, top = gather_logprobs(logits, target, topk)
        obj = (lp * g_lp).sum() + (top * g_top).sum()
    obj.backward()
    ref_obj.backward()
    got, want = logits.grad.double(), ref_logits.grad
    bound = 2.0 ** -8 * want.abs() + 1e-6
    assert ((got - want).abs() <= bound).all(), (got - want).abs().div(want.abs()).max()


def test_gather_logprobs_gradients_match_reference():
    B, T, V, K = 2, 3, 11, 4
    logits = (torch.randn(B, T, V, generator=_gen(6)) * 2).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=_gen(7))
    ids = torch.randint(0, V, (B, T, K), generator=_gen(8))
    w = torch.randn(B, T, generator=_gen(9))
    u = torch.randn(B, T, K, generator=_gen(10))

    logp, topk = gather_logprobs(logits, targets, ids)
    (g,) = torch.autograd.grad((w * logp).sum() + (u * topk).sum(), logits)

    ref_all = torch.log_softmax(logits, -1)
    ref_logp = ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_topk = ref_all.gather(-1, ids)
    (g_ref,) = torch.autograd.grad((w * ref_logp).sum() + (u * ref_topk).sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert g.abs().sum() > 0


# --------------------------------------------------------------------------- exact_kl


def _brute_kl_row(base_row, policy_row) -> float:
    """sum_v p log(p / q) in float64 by a loop; 0 log 0 = 0; inf when q = 0 < p."""
    def logsoftmax(row):
        finite = [x for x in row if math.isfinite(x)]
        m = max(finite)
        lse = m + math.log(sum(math.exp(x - m) for x in finite))
        return [x - lse for x in row]

    lp, lq = logsoftmax(base_row), logsoftmax(policy_row)
    total = 0.0
    for a, b in zip(lp, lq):
        p = math.exp(a)
        if p == 0.0:
            continue
        if b == float("-inf"):
            return float("inf")
        total += p * (a - b)
    return total


def _brute_kl(base, policy):
    B, T, _ = base.shape
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            out[b, t] = _brute_kl_row(base[b, t].double().tolist(), policy[b, t].double().tolist())
    return out


def test_exact_kl_vs_loop_and_torch_distributions():
    base = torch.randn(3, 4, 13, generator=_gen(11)) * 2
    policy = base + torch.randn(3, 4, 13, generator=_gen(12))
    got = exact_kl(base, policy)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _brute_kl(base, policy), atol=1e-5, rtol=1e-5)
    ref = kl_divergence(Categorical(logits=base), Categorical(logits=policy))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # direction: KL(base || policy), not the reverse
    rev = kl_divergence(Categorical(logits=policy), Categorical(logits=base))
    assert not torch.allclose(got, rev, atol=1e-3)
    assert (got >= -1e-6).all()


def test_exact_kl_identical_logits_is_zero_and_shift_invariant():
    base = torch.randn(2, 5, 31, generator=_gen(13)) * 3
    torch.testing.assert_close(exact_kl(base, base), torch.zeros(2, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(exact_kl(base, base + 7.0), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_exact_kl_gradient_flows_to_policy_only():
    base = torch.randn(2, 3, 9, generator=_gen(14))
    policy = (base + torch.randn(2, 3, 9, generator=_gen(15))).requires_grad_(True)
    exact_kl(base, policy).sum().backward()
    # d/dz_q KL(p || softmax(z_q)) = softmax(z_q) - p
    expected = torch.softmax(policy.detach(), -1) - torch.softmax(base, -1)
    torch.testing.assert_close(policy.grad, expected, atol=1e-6, rtol=1e-5)


def test_exact_kl_with_minus_inf_logits_matches_torch_distributions():
    """A masked vocabulary (-inf logits) in the base: those tokens have p = 0 and add 0."""
    base = torch.randn(2, 3, 8, generator=_gen(16))
    policy = base + torch.randn(2, 3, 8, generator=_gen(17))
    base[0, 0, 2:5] = float("-inf")  # masked in the base only
    base[1, 2, 7] = float("-inf")
    policy[1, 2, 7] = float("-inf")  # masked in both
    ref = kl_divergence(Categorical(logits=base), Categorical(logits=policy))
    got = exact_kl(base, policy)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(got).all(), f"exact_kl gave {got} where the KL is {ref}"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), _brute_kl(base, policy), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- topk_kl


def _brute_coarse_kl(base_logits, policy_logits, K) -> torch.Tensor:
    """KL between base and policy coarsened to (base top-K tokens, one 'rest' bucket), float64."""
    B, T, _ = base_logits.shape
    out = torch.empty(B, T, dtype=torch.float64)
    p_all = torch.softmax(base_logits.double(), -1)
    q_all = torch.softmax(policy_logits.double(), -1)
    for b in range(B):
        for t in range(T):
            p = p_all[b, t].tolist()
            q = q_all[b, t].tolist()
            top = sorted(range(len(p)), key=lambda v: p[v], reverse=True)[:K]
            p_head = [p[v] for v in top]
            q_head = [q[v] for v in top]
            p_rest = max(0.0, 1.0 - sum(p_head))
            q_rest = max(0.0, 1.0 - sum(q_head))
            total = sum(a * math.log(a / c) for a, c in zip(p_head, q_head) if a > 0)
            if p_rest > 1e-12:
                total += p_rest * math.log(p_rest / q_rest)
            out[b, t] = total
    return out


def _topk_inputs(base, policy, K):
    base_logp = torch.log_softmax(base, -1)
    top = base_logp.topk(K, dim=-1)
    dummy = torch.zeros(base.shape[:-1], dtype=torch.long)
    _, policy_topk = gather_logprobs(policy, dummy, top.indices)
    return top.values, policy_topk


def test_topk_kl_with_k_equal_v_is_exact_kl():
    V = 12
    base = torch.randn(3, 5, V, generator=_gen(18)) * 2
    policy = base + torch.randn(3, 5, V, generator=_gen(19))
    got = topk_kl(*_topk_inputs(base, policy, V))
    torch.testing.assert_close(got, exact_kl(base, policy), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("K", [1, 3, 8])
def test_topk_kl_is_the_coarsened_kl_and_below_exact(K):
    V = 16
    base = torch.randn(3, 4, V, generator=_gen(20 + K)) * 1.5
    policy = base + torch.randn(3, 4, V, generator=_gen(30 + K)) * 1.5
    got = topk_kl(*_topk_inputs(base, policy, K))
    ref = _brute_coarse_kl(base, policy, K)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)
    exact = exact_kl(base, policy)
    assert (got <= exact + 1e-5).all()  # data-processing inequality
    assert (exact - got).max() > 1e-3  # and coarsening really loses something here


def test_topk_kl_k64_relative_error_on_peaked_distributions():
    B, T, V, K = 4, 16, 1000, 64
    base = torch.randn(B, T, V, generator=_gen(40)) * 5
    policy = base + torch.randn(B, T, V, generator=_gen(41))
    approx = topk_kl(*_topk_inputs(base, policy, K))
    exact = exact_kl(base, policy)
    assert (approx <= exact + 1e-5).all()
    total_rel = ((exact.sum() - approx.sum()) / exact.sum()).item()
    per_pos_rel = ((exact - approx) / exact).abs()
    # measured (torch 2.13 CPU, this seed; mean exact KL 0.28 nats, base mass outside
    # the top-64 0.5% on average, 3.7% at most): total 0.87%, mean per position 1.0%,
    # max per position 3.0%
    assert 0.0 <= total_rel < 0.02
    assert per_pos_rel.mean().item() < 0.02
    assert per_pos_rel.max().item() < 0.05


def test_topk_kl_gradient_flows_into_policy_topk_logp():
    K, V = 4, 10
    base = torch.randn(2, 3, V, generator=_gen(42)) * 2
    policy = (base + torch.randn(2, 3, V, generator=_gen(43))).requires_grad_(True)
    base_topk, policy_topk = _topk_inputs(base, policy, K)
    policy_topk_leaf = policy_topk.detach().requires_grad_(True)
    topk_kl(base_topk, policy_topk_leaf).sum().backward()
    # analytic: d/dl_k [ -sum p_k l_k - P_rest log(1 - sum exp l) ] = -p_k + P_rest e^{l_k}/Q_rest
    p = base_topk.exp()
    q = policy_topk_leaf.detach().exp()
    p_rest = (1 - p.sum(-1, keepdim=True)).clamp_min(0)
    q_rest = 1 - q.sum(-1, keepdim=True)
    expected = -p + p_rest * q / q_rest
    torch.testing.assert_close(policy_topk_leaf.grad, expected, atol=1e-5, rtol=1e-4)
    # and end to end into the policy logits, against autograd of the float64 brute force
    (g,) = torch.autograd.grad(topk_kl(base_topk, policy_topk).sum(), policy)
    pol64 = policy.detach().double().requires_grad_(True)
    lq = torch.log_softmax(pol64, -1)
    ids = base.topk(K, -1).indices
    lq_head = lq.gather(-1, ids)
    p64 = torch.softmax(base.double(), -1).gather(-1, ids)
    prest = 1 - p64.sum(-1)
    ref = (p64 * (p64.log() - lq_head)).sum(-1) + prest * (prest.log() - torch.log1p(-lq_head.exp().sum(-1)))
    (g_ref,) = torch.autograd.grad(ref.sum(), pol64)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)
    assert g.abs().sum() > 0


def test_topk_kl_with_fewer_finite_base_tokens_than_k():
    """Masked vocabulary: the base top-k contains -inf log-probs (p = 0): they add 0."""
    V, K = 8, 6
    base = torch.randn(2, 2, V, generator=_gen(44))
    base[..., 4:] = float("-inf")  # only 4 tokens allowed, K = 6
    policy = torch.randn(2, 2, V, generator=_gen(45))
    got = topk_kl(*_topk_inputs(base, policy, K))
    ref = kl_divergence(Categorical(logits=base), Categorical(logits=policy))
    assert torch.isfinite(got).all(), f"topk_kl gave {got}, the KL is {ref}"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- fork_gated_loss


def _brute_loss(policy_logp, base_logp, adv, fork, comp, kl, *, kl_coef, variant,
                neg_prob_floor=0.05, hinge_margin=1.0, split_neg_denominator="negative_forks"):
    """The docstring's loss, one (b, t) position at a time, in float64 Python."""
    B, T = policy_logp.shape
    F_, N_ = [], []
    for b in range(B):
        for t in range(T):
            if not comp[b, t]:
                continue
            (F_ if fork[b, t] else N_).append((b, t))
    lp = lambda b, t: float(policy_logp[b, t])
    blp = lambda b, t: float(base_logp[b, t])
    A = lambda b: float(adv[b])
    pos = [(b, t) for b, t in F_ if A(b) > 0]
    neg = [(b, t) for b, t in F_ if A(b) < 0]
    # the floor acts in signed and split only
    active_neg = [(b, t) for b, t in neg if variant not in ("signed", "split") or math.exp(lp(b, t)) >= neg_prob_floor]
    floored = [x for x in neg if x not in active_neg]

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    if variant == "signed":
        num = sum(A(b) * -lp(b, t) for b, t in pos + active_neg)
        fork_term = num / len(F_) if F_ else 0.0
    elif variant == "positive_only":
        fork_term = mean([A(b) * -lp(b, t) for b, t in pos])
    elif variant == "split":
        pos_part = mean([A(b) * -lp(b, t) for b, t in pos])
        denom = len(neg) if split_neg_denominator == "negative_forks" else len(active_neg)
        neg_part = sum(A(b) * -lp(b, t) for b, t in active_neg) / denom if denom else 0.0
        fork_term = pos_part + neg_part
    elif variant == "hinge":
        vals = []
        for b, t in F_:
            sgn = (A(b) > 0) - (A(b) < 0)
            vals.append(abs(A(b)) * max(0.0, hinge_margin - sgn * (lp(b, t) - blp(b, t))))
        fork_term = mean(vals)
    elif variant == "correct_sft":  # unweighted NLL at correct forks; every other position anchored
        fork_term = mean([-lp(b, t) for b, t in pos])
    else:
        raise AssertionError(variant)
    anchored = N_ + [x for x in F_ if x not in pos] if variant == "correct_sft" else N_
    kl_term = mean([float(kl[b, t]) for b, t in anchored])
    n_comp = len(F_) + len(N_)
    stats = {
        "fork_term": fork_term,
        "kl_term": kl_term,
        "loss": fork_term + kl_coef * kl_term,
        "fork_fraction": len(F_) / n_comp if n_comp else 0.0,
        "forks": float(len(F_)),
        "forks_correct": float(len(pos)),
        "forks_wrong": float(len(neg)),
        "forks_floored": float(len(floored)),
        "no_fork": 1.0 if not F_ else 0.0,
        "dlogp_pos_forks": mean([lp(b, t) - blp(b, t) for b, t in pos]),
        "dlogp_neg_forks": mean([lp(b, t) - blp(b, t) for b, t in neg]),
        "kl_fork_mean": mean([float(kl[b, t]) for b, t in F_]),
        "kl_nonfork_mean": mean([float(kl[b, t]) for b, t in N_]),
    }
    return stats


def _batch(seed=0, B=5, T=7, *, poison_padding=True, floor_safe=False):
    """Random rollouts with prompt/padding; 1e6-sized garbage at non-completion positions."""
    g = _gen(seed)
    comp = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        start = int(torch.randint(0, 2, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        comp[b, start : start + length] = 1
    comp[0, :] = 1  # at least one full row
    low = 0.08 if floor_safe else 0.005
    probs = low + (0.95 - low) * torch.rand(B, T, generator=g)
    policy_logp = probs.log()
    base_logp = (0.01 + 0.9 * torch.rand(B, T, generator=g)).log()
    kl = torch.rand(B, T, generator=g) * 0.5
    fork = torch.rand(B, T, generator=g) < 0.45
    adv = torch.tensor([1.3, -0.7, 0.0, -2.1, 0.6, 2.5, -1.0][:B])
    if poison_padding:
        pad = comp == 0
        policy_logp = policy_logp.masked_fill(pad, -1e6)
        base_logp = base_logp.masked_fill(pad, -1e6)
        kl = kl.masked_fill(pad, 1e6)
        fork = fork | pad  # a gate that (wrongly) marks padding must still be ignored
    return dict(policy_logp=policy_logp, base_logp=base_logp, advantages=adv,
                fork_mask=fork, completion_mask=comp, kl=kl)


def _call(batch, **kw):
    pl = batch["policy_logp"].clone().requires_grad_(True)
    kl = batch["kl"].clone().requires_grad_(True)
    loss, stats = _gated_loss(
        pl, batch["base_logp"], batch["advantages"], batch["fork_mask"],
        batch["completion_mask"], kl, **kw,
    )
    return loss, stats, pl, kl


def _check_against_brute(batch, *, kl_coef, variant, neg_prob_floor=0.05, hinge_margin=1.0, **bkw):
    loss, stats, pl, kl = _call(batch, kl_coef=kl_coef, variant=variant,
                                neg_prob_floor=neg_prob_floor, hinge_margin=hinge_margin)
    ref = _brute_loss(batch["policy_logp"], batch["base_logp"], batch["advantages"],
                      batch["fork_mask"], batch["completion_mask"], batch["kl"],
                      kl_coef=kl_coef, variant=variant, neg_prob_floor=neg_prob_floor,
                      hinge_margin=hinge_margin, **bkw)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-5, abs=1e-5)
    for key, value in ref.items():
        assert key in stats, key
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    loss.backward()
    comp = batch["completion_mask"].bool()
    # padding never receives gradient, whatever the garbage there
    assert (pl.grad[~comp] == 0).all() and (kl.grad[~comp] == 0).all()
    assert torch.isfinite(pl.grad).all() and torch.isfinite(kl.grad).all()
    return loss, stats, pl, kl


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kl_coef", [0.0, 0.2])
def test_fork_gated_loss_vs_brute_force(variant, seed, kl_coef):
    # floor_safe: no negative fork is floored, so the normalisation question of 'split'
    # (see test_split_floor_normalisation) does not arise here
    batch = _batch(seed, floor_safe=True)
    _check_against_brute(batch, kl_coef=kl_coef, variant=variant)


@pytest.mark.parametrize("variant", ["signed", "split"])
@pytest.mark.parametrize("floor", [0.0, 0.05, 0.3])
def test_fork_gated_loss_neg_prob_floor(variant, floor):
    batch = _batch(7, B=7, T=9, floor_safe=False)
    if variant == "signed":
        _, stats, pl, _ = _check_against_brute(batch, kl_coef=0.1, variant=variant,
                                               neg_prob_floor=floor)
    else:  # the value of 'split' with floored forks: test_split_floor_normalisation
        loss, stats, pl, _ = _call(batch, kl_coef=0.1, variant=variant, neg_prob_floor=floor)
        loss.backward()
    if floor >= 0.3:
        assert stats["forks_floored"] > 0  # the rule is exercised
    # floored forks get no gradient; active negative forks are pushed down (grad > 0 on -lp)
    comp = batch["completion_mask"].bool()
    forks = batch["fork_mask"] & comp
    neg = forks & (batch["advantages"] < 0).unsqueeze(-1)
    floored = neg & (batch["policy_logp"].exp() < floor)
    assert (pl.grad[floored] == 0).all()
    assert (pl.grad[neg & ~floored] > 0).all()  # d loss / d logp > 0: descent lowers logp


def test_split_floor_normalisation():
    """'split': positive and negative forks normalised separately (docstring).

    Hand-made: one positive fork, four negative forks of which two are floored. The
    negative part is the sum over the active negative forks divided by the number of
    negative forks, as 'signed' keeps floored forks in |F|: a floored fork gets no
    push-down, and flooring it must not raise the push-down of the others.
    """
    policy_logp = torch.tensor([[math.log(0.5), math.log(0.4), math.log(0.6),
                                 math.log(0.01), math.log(0.02)]])
    policy_logp = policy_logp.expand(2, 5).clone()
    adv = torch.tensor([1.0, -2.0])
    fork = torch.tensor([[True, False, False, False, False], [False, True, True, True, True]])
    comp = torch.ones(2, 5)
    kl = torch.zeros(2, 5)
    loss, stats = _gated_loss(policy_logp, policy_logp, adv, fork, comp, kl,
                                  kl_coef=0.0, variant="split", neg_prob_floor=0.05)
    pos_part = 1.0 * -math.log(0.5)
    neg_part = (-2.0 * -math.log(0.4) + -2.0 * -math.log(0.6)) / 4
    assert stats["forks_floored"] == 2
    assert loss.item() == pytest.approx(pos_part + neg_part, abs=1e-5), (
        "split divides by the 2 active negative forks, not the 4 negative forks: "
        f"got {loss.item():.6f}, expected {pos_part + neg_part:.6f}"
    )


def test_kl_term_is_kl_coef_times_mean_over_nonfork_completion_positions():
    batch = _batch(3, floor_safe=True)
    comp = batch["completion_mask"].bool()
    nonfork = comp & ~batch["fork_mask"]
    expected_kl = batch["kl"][nonfork].double().mean().item()
    l0, s0, _, _ = _call(batch, kl_coef=0.0)
    l1, s1, _, kl = _call(batch, kl_coef=0.7)
    assert s1["kl_term"] == pytest.approx(expected_kl, rel=1e-6)
    assert (l1 - l0).item() == pytest.approx(0.7 * expected_kl, rel=1e-5)
    l1.backward()
    g = torch.zeros_like(kl.grad)
    g[nonfork] = 0.7 / nonfork.sum()
    torch.testing.assert_close(kl.grad, g)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_padding_never_contributes(variant):
    clean = _batch(4, poison_padding=False, floor_safe=True)
    dirty = _batch(4, poison_padding=True, floor_safe=True)
    lc, sc, _, _ = _call(clean, kl_coef=0.3, variant=variant)
    ld, sd, _, _ = _call(dirty, kl_coef=0.3, variant=variant)
    assert ld.item() == pytest.approx(lc.item(), rel=1e-6, abs=1e-7)
    for key in sc:
        assert sd[key] == pytest.approx(sc[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_no_fork_in_batch(variant):
    batch = _batch(5)
    batch["fork_mask"] = torch.zeros_like(batch["fork_mask"])
    loss, stats, pl, kl = _call(batch, kl_coef=0.2, variant=variant)
    comp = batch["completion_mask"].bool()
    expected = 0.2 * batch["kl"][comp].double().mean().item()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["no_fork"] == 1.0 and stats["forks"] == 0 and stats["fork_term"] == 0.0
    assert stats["fork_fraction"] == 0.0
    for key, v in stats.items():
        assert math.isfinite(v), key
    loss.backward()
    assert torch.isfinite(pl.grad).all() and (pl.grad == 0).all()
    assert kl.grad[comp].gt(0).all()
    # with no fork and no KL weight the loss is 0 and still differentiable
    l0, _, _, _ = _call(batch, kl_coef=0.0, variant=variant)
    assert l0.item() == 0.0
    l0.backward()


# correct_sft anchors the wrong rollouts' forks, so its KL term is not zero here.
@pytest.mark.parametrize("variant", [v for v in LOSS_VARIANTS if v != "correct_sft"])
def test_all_forks_kl_term_zero(variant):
    batch = _batch(6, floor_safe=True)
    batch["fork_mask"] = batch["completion_mask"].bool()
    loss, stats, pl, kl = _check_against_brute(batch, kl_coef=0.5, variant=variant)
    assert stats["kl_term"] == 0.0 and stats["fork_fraction"] == 1.0 and stats["no_fork"] == 0.0
    assert loss.item() == pytest.approx(stats["fork_term"], abs=1e-7)
    assert (kl.grad == 0).all()


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_one_token_completions(variant):
    B, T = 4, 5
    batch = _batch(8, B=B, T=T, floor_safe=True)
    comp = torch.zeros(B, T, dtype=torch.long)
    for b, t in enumerate([4, 2, 0, 3]):
        comp[b, t] = 1
    pad = comp == 0
    batch["completion_mask"] = comp
    batch["policy_logp"] = batch["policy_logp"].masked_fill(pad, -1e6)
    batch["base_logp"] = batch["base_logp"].masked_fill(pad, -1e6)
    batch["kl"] = batch["kl"].masked_fill(pad, 1e6)
    batch["fork_mask"] = torch.tensor([[0, 0, 0, 0, 1], [1, 1, 0, 1, 1],
                                       [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    loss, stats, _, _ = _check_against_brute(batch, kl_coef=0.3, variant=variant)
    assert stats["forks"] == 2 and stats["fork_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_zero_advantage_rollouts_contribute_nothing(variant):
    batch = _batch(9, floor_safe=True)
    assert batch["advantages"][2] == 0
    batch["fork_mask"][2] = batch["completion_mask"][2].bool()  # its tokens are all forks
    l1, s1, pl, _ = _call(batch, kl_coef=0.0, variant=variant)
    l1.backward()
    assert (pl.grad[2] == 0).all()
    other = dict(batch)
    other["policy_logp"] = batch["policy_logp"].clone()
    other["policy_logp"][2] = torch.log(torch.full_like(other["policy_logp"][2], 0.9))
    other["base_logp"] = batch["base_logp"].clone()
    other["base_logp"][2] = -3.0
    l2, _, _, _ = _call(other, kl_coef=0.0, variant=variant)
    assert l2.item() == pytest.approx(l1.item(), rel=1e-6, abs=1e-7)
    assert s1["forks_correct"] + s1["forks_wrong"] < s1["forks"]


def test_unknown_variant_raises():
    batch = _batch(0)
    with pytest.raises(ValueError):
        _call(batch, kl_coef=0.1, variant="ppo")


# --------------------------------------------------------------------------- the lower bound


def _optimise(variant, neg_prob_floor, steps=200, lr=0.1):
    B, T, V = 4, 5, 6
    g = _gen(50)
    logits = (torch.randn(B, T, V, generator=g) * 0.5).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    base_logp, _ = gather_logprobs(logits.detach(), targets)
    adv = torch.tensor([1.5, -2.0, 0.5, -1.0])
    comp = torch.ones(B, T)
    forks = torch.ones(B, T, dtype=torch.bool)
    opt = torch.optim.Adam([logits], lr=lr)
    losses, floored = [], []
    for _ in range(steps):
        logp, _ = gather_logprobs(logits, targets)
        loss, stats = _gated_loss(logp, base_logp, adv, forks, comp, torch.zeros(B, T),
                                      kl_coef=0.0, variant=variant, neg_prob_floor=neg_prob_floor)
        losses.append(loss.item())
        floored.append(stats["forks_floored"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses, floored, adv.abs().max().item()


def test_signed_loss_without_floor_is_unbounded():
    losses, _, amax = _optimise("signed", 0.0)
    bound = -amax * math.log(1 / 0.05)
    assert losses[-1] < 2 * bound  # far below the floored bound
    assert losses[-1] < losses[150] - 0.5 < losses[100] - 1.0  # still falling


@pytest.mark.parametrize("variant", ["signed", "split"])
def test_signed_loss_with_floor_is_bounded_below(variant):
    losses, floored, amax = _optimise(variant, 0.05)
    bound = -amax * math.log(1 / 0.05)
    assert min(losses) >= bound - 1e-4
    assert max(floored) > 0  # the floor was reached, so the bound was tested


def test_hinge_loss_stays_nonnegative():
    losses, _, _ = _optimise("hinge", 0.05)
    assert min(losses) >= 0.0
    assert losses[-1] < 0.05 * losses[0]  # it does optimise: the margins get met


# --------------------------------------------------------------------------- gradient direction


def test_sgd_step_direction_and_nonfork_untouched():
    B, T, V = 4, 6, 5
    g = _gen(60)
    base_logits = torch.randn(B, T, V, generator=g) * 0.3
    logits = (base_logits + 0.3 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.tensor([1.0, -1.5, 0.0, 2.0])
    comp = torch.ones(B, T)
    comp[3, 4:] = 0  # padding
    forks = torch.rand(B, T, generator=g) < 0.5
    forks[:, 0] = True
    forks[:, 1] = False
    fork_c = forks & comp.bool()
    base_logp, _ = gather_logprobs(base_logits, targets)

    def step(kl_coef):
        z = logits.detach().clone().requires_grad_(True)
        logp, _ = gather_logprobs(z, targets)
        kl = exact_kl(base_logits, z)
        loss, _ = _gated_loss(logp, base_logp, adv, forks, comp, kl,
                                  kl_coef=kl_coef, variant="signed", neg_prob_floor=0.05)
        loss.backward()
        with torch.no_grad():
            new = z - 0.5 * z.grad
            before, _ = gather_logprobs(z, targets)
            after, _ = gather_logprobs(new, targets)
        return z.detach(), new, before, after

    old, new, before, after = step(0.0)
    a = adv.unsqueeze(-1).expand(B, T)
    up = fork_c & (a > 0)
    down = fork_c & (a < 0)
    assert (after[up] > before[up]).all()
    assert (after[down] < before[down]).all()
    still = ~fork_c | (a == 0)  # non-forks, padding, zero-advantage forks
    assert torch.equal(new[still], old[still])
    # the KL anchor does move non-fork completion positions (so the check above can fail)
    _, new_kl, _, _ = step(1.0)
    nonfork = comp.bool() & ~forks
    assert not torch.equal(new_kl[nonfork], old[nonfork])
    assert torch.equal(new_kl[~comp.bool()], old[~comp.bool()])


# ----------------------------------------------------------------------------- fused log-probs


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_policy_logprobs_values_and_gradients_match_autograd(chunk_rows):
    from reasonmaxxer.core.logprobs import policy_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 11, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 11, (2, 5))
    topk = torch.randint(0, 11, (2, 5, 4))
    g_logp, g_topk, g_lse = torch.randn(2, 5), torch.randn(2, 5, 4), torch.randn(2, 5)

    logp, topk_logp, lse = policy_logprobs(logits, target, topk, chunk_rows=chunk_rows)
    (logp * g_logp).sum().add((topk_logp * g_topk).sum()).add((lse * g_lse).sum()).backward()
    fused_grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_()
    ref_lse = torch.logsumexp(ref_logits, -1)
    ref_logp = torch.log_softmax(ref_logits, -1)
    ref_t = ref_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref_k = ref_logp.gather(-1, topk)
    (ref_t * g_logp).sum().add((ref_k * g_topk).sum()).add((ref_lse * g_lse).sum()).backward()

    assert torch.allclose(logp.double(), ref_t, atol=1e-5)
    assert torch.allclose(topk_logp.double(), ref_k, atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    assert torch.allclose(fused_grad, ref_logits.grad, atol=1e-5)


def test_exact_kl_with_shared_lse_has_the_exact_gradient():
    from reasonmaxxer.core.logprobs import policy_logprobs

    torch.manual_seed(1)
    base = torch.randn(2, 4, 9) * 2
    policy = (base + torch.randn(2, 4, 9)).requires_grad_()
    _, _, lse = policy_logprobs(policy, torch.zeros(2, 4, dtype=torch.long))
    exact_kl(base, policy, policy_lse=lse).sum().backward()
    ref = policy.detach().clone().requires_grad_()
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=base),
                                           torch.distributions.Categorical(logits=ref))
    kl.sum().backward()
    assert torch.allclose(policy.grad, ref.grad, atol=1e-5)


def test_inf_and_nan_outside_the_completion_do_not_leak():
    torch.manual_seed(0)
    policy_logp = -torch.rand(2, 4)
    completion = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    forks = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    kl = torch.rand(2, 4)
    clean, _ = _gated_loss(policy_logp, policy_logp, torch.tensor([1.0, -1.0]), forks, completion, kl,
                               kl_coef=0.3)
    dirty_logp = policy_logp.clone()
    dirty_kl = kl.clone()
    dirty_logp[completion == 0] = float("-inf")
    dirty_kl[0, 3] = float("nan")
    dirty_kl[1, 3] = float("inf")
    dirty, stats = _gated_loss(dirty_logp, dirty_logp, torch.tensor([1.0, -1.0]), forks, completion,
                                   dirty_kl, kl_coef=0.3)
    assert torch.isfinite(dirty) and dirty.item() == pytest.approx(clean.item())
    assert all(v == v for v in stats.values())  # no NaN statistic


@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kl_matches_exact_kl_and_torch_distributions(chunk_rows, dtype):
    """Values and gradients of the one-pass KL against the plain exact_kl under autograd."""
    from reasonmaxxer.core.logprobs import policy_logprobs_and_kl

    torch.manual_seed(1)
    B, T, V = 3, 4, 13
    base = torch.randn(B, T, V, dtype=dtype) * 2
    base[0, 0, :5] = float("-inf")  # tokens the base rules out
    policy = (torch.randn(B, T, V, dtype=dtype) * 2)
    policy[0, 0, :3] = float("-inf")  # and the policy too, only where the base has no mass
    policy.requires_grad_()
    target = torch.randint(5, V, (B, T))
    topk = torch.randint(5, V, (B, T, 2))
    g_logp, g_topk, g_lse, g_kl = (torch.randn(B, T), torch.randn(B, T, 2), torch.randn(B, T), torch.randn(B, T))

    logp, topk_logp, lse, kl = policy_logprobs_and_kl(policy, target, base, topk, chunk_rows=chunk_rows)
    ((logp * g_logp).sum() + (topk_logp * g_topk).sum() + (lse * g_lse).sum() + (kl * g_kl).sum()).backward()
    fused_grad = policy.grad.clone()

    ref = policy.detach().double().clone().requires_grad_()
    ref_logp = torch.log_softmax(ref, -1)
    ref_kl = exact_kl(base.double(), ref)
    ((ref_logp.gather(-1, target[..., None])[..., 0] * g_logp).sum() + (ref_logp.gather(-1, topk) * g_topk).sum()
     + (torch.logsumexp(ref, -1) * g_lse).sum() + (ref_kl * g_kl).sum()).backward()

    # Both compute in fp32 (the logits are upcast chunk by chunk; exact_kl upcasts too).
    torch.testing.assert_close(kl.double(), ref_kl.detach().double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_grad.double(), ref.grad, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(kl).all() and torch.isfinite(fused_grad).all()
    # An independent value: torch.distributions at a position without -inf.
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=base[2, 3].double()),
                                             torch.distributions.Categorical(logits=policy[2, 3].detach().double()))
    assert kl[2, 3].item() == pytest.approx(want.item(), rel=1e-5)


def test_fused_kl_bf16_logits_and_no_grad_to_the_base():
    from reasonmaxxer.core.logprobs import policy_logprobs_and_kl

    torch.manual_seed(2)
    base = (torch.randn(2, 3, 17) * 2).bfloat16().requires_grad_()
    policy = (torch.randn(2, 3, 17) * 2).bfloat16().requires_grad_()
    target = torch.randint(0, 17, (2, 3))
    _, _, _, kl = policy_logprobs_and_kl(policy, target, base)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, exact_kl(base.detach(), policy.detach()), atol=1e-4, rtol=1e-4)
    kl.sum().backward()
    assert base.grad is None and policy.grad is not None and policy.grad.dtype == torch.bfloat16
    p_pol = torch.softmax(policy.detach().float(), -1)
    p_base = torch.softmax(base.detach().float(), -1)
    torch.testing.assert_close(policy.grad.float(), p_pol - p_base, atol=1e-2, rtol=0)


def test_loss_stats_are_detached_device_tensors() -> None:
    """Statistics come back as () tensors without a graph (no host sync until read), every key present."""
    torch.manual_seed(0)
    logp = torch.randn(2, 5).clamp_max(-0.01).requires_grad_(True)
    kl = torch.rand(2, 5, requires_grad=True)
    forks = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    _, stats = fork_gated_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), forks, torch.ones(2, 5), kl,
                               kl_coef=0.2)
    assert tuple(stats) == LOSS_STATS
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad, key
    floats = stats_to_floats(stats)
    assert floats["forks"] == 4.0 and floats["forks_correct"] == 2.0 and floats["forks_wrong"] == 2.0
    assert floats["fork_fraction"] == pytest.approx(0.4)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("floored_forks", ["drop", "anchor"])
def test_forks_floored_counts_only_where_a_floor_acts(variant, floored_forks):
    """One wrong-rollout fork sits at p = 0.01 < floor: floored in signed/split, nowhere else."""
    policy_logp = torch.tensor([[0.5, 0.6], [0.01, 0.7]]).log()
    base_logp = torch.tensor([[0.4, 0.5], [0.05, 0.6]]).log()
    fork = torch.tensor([[True, False], [True, False]])
    _, stats = _gated_loss(policy_logp, base_logp, torch.tensor([1.0, -1.0]), fork, torch.ones(2, 2),
                           torch.full((2, 2), 0.1), kl_coef=0.2, variant=variant, neg_prob_floor=0.05,
                           floored_forks=floored_forks)
    assert stats["forks_floored"] == (1.0 if variant in ("signed", "split") else 0.0)

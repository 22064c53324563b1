"""Tests for reasonmaxxer.evaluation.movement against independent computations.

References: torch.distributions (KL, entropy), Python loops over the vocabulary in
float64 (KL, JS, ranks), Python aggregation for summarize / deciles / overlap, and two
plain full forwards of a tiny PEFT model (adapter disabled / enabled) for
movement_for_batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from reasonmaxxer.core.entropy import token_entropy
from reasonmaxxer.core.kl import exact_kl
from reasonmaxxer.evaluation.movement import (
    MOVEMENT_KEYS,
    RERANKED,
    SHIFTED,
    UNSHIFTED,
    entropy_deciles,
    high_entropy_overlap,
    movement_for_batch,
    position_movement,
    summarize,
)
from reasonmaxxer.stages.scoring import score_batch
from reasonmaxxer.utils.sequences import pack_batch

LN2 = math.log(2.0)
NEG_INF = float("-inf")


def _probs(row: torch.Tensor) -> list[float]:
    """Softmax of one logit row in float64, by hand."""
    vals = [float(x) for x in row.double()]
    m = max(vals)
    ex = [math.exp(v - m) if v != NEG_INF else 0.0 for v in vals]
    s = sum(ex)
    return [e / s for e in ex]


def _brute_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _brute_js(p: list[float], q: list[float]) -> float:
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    return 0.5 * _brute_kl(p, m) + 0.5 * _brute_kl(q, m)


def _random_logits(seed: int, shape, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale


# ----------------------------------------------------------------------------------------
# position_movement on hand-made tensors


def test_kl_js_logp_entropy_match_independent_references():
    B, T, V = 2, 4, 11
    base = _random_logits(0, (B, T, V))
    policy = base + _random_logits(1, (B, T, V), scale=1.5)
    target = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    out = position_movement(base, policy, target, entropy_temperature=0.6)
    assert set(out) == set(MOVEMENT_KEYS)
    for key, value in out.items():
        assert value.shape == (B, T), key

    ref_kl = kl_divergence(Categorical(logits=base), Categorical(logits=policy))
    torch.testing.assert_close(out["kl"], ref_kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["kl"], exact_kl(base, policy), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out["base_entropy"], Categorical(logits=base / 0.6).entropy(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        position_movement(base, policy, target)["base_entropy"],
        Categorical(logits=base).entropy(),
        atol=1e-5,
        rtol=1e-5,
    )
    for b in range(B):
        for t in range(T):
            p, q = _probs(base[b, t]), _probs(policy[b, t])
            assert out["kl"][b, t].item() == pytest.approx(_brute_kl(p, q), abs=1e-5, rel=1e-5)
            js = _brute_js(p, q)
            assert out["js"][b, t].item() == pytest.approx(js, abs=1e-6, rel=1e-5)
            y = int(target[b, t])
            assert out["base_logp"][b, t].item() == pytest.approx(math.log(p[y]), abs=1e-5)
            assert out["policy_logp"][b, t].item() == pytest.approx(math.log(q[y]), abs=1e-5)
            # rank of the policy's argmax under the base, by sorting in Python
            p_arg = max(range(V), key=lambda v: (q[v], -v))
            b_arg = max(range(V), key=lambda v: (p[v], -v))
            order = sorted(range(V), key=lambda v: (-float(base[b, t, v]), v))
            assert out["top1_agree"][b, t].item() == (p_arg == b_arg)
            assert out["promoted_base_rank"][b, t].item() == order.index(p_arg) + 1
    assert (out["js"] >= 0).all() and (out["js"] <= LN2).all()
    assert out["top1_agree"].dtype == torch.bool
    assert out["shift_class"].dtype == torch.int8


def test_js_bounded_by_ln2_and_reaches_it_on_disjoint_supports():
    base = torch.tensor([[[0.0, NEG_INF, NEG_INF], [5.0, -5.0, 0.0]]])
    policy = torch.tensor([[[NEG_INF, 0.0, NEG_INF], [-50.0, 50.0, 0.0]]])
    out = position_movement(base, policy, torch.zeros(1, 2, dtype=torch.long))
    assert out["js"][0, 0].item() == pytest.approx(LN2, abs=1e-6)
    assert out["js"][0, 1].item() <= LN2
    assert out["js"][0, 1].item() == pytest.approx(
        _brute_js(_probs(base[0, 1]), _probs(policy[0, 1])), abs=1e-5
    )
    # The policy rules out the base's only token: the true KL is infinite, not nan.
    assert out["kl"][0, 0].item() == math.inf
    assert not torch.isnan(torch.stack([v.float() for v in out.values()])).any()


def test_identical_logits_do_not_move():
    base = _random_logits(3, (3, 5, 17), scale=4.0)
    target = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(4))
    out = position_movement(base, base.clone(), target)
    assert (out["kl"] == 0).all()
    assert (out["js"].abs() < 1e-7).all()
    assert out["top1_agree"].all()
    assert (out["shift_class"] == UNSHIFTED).all()
    assert (out["promoted_base_rank"] == 1).all()
    assert (out["policy_logp"] == out["base_logp"]).all()
    flat = {k: v.reshape(-1) for k, v in out.items()}
    fork = torch.arange(15) % 3 == 0
    s = summarize(flat, fork, torch.arange(15) % 2 == 0)
    for part in ("fork", "nonfork"):
        assert s[part]["promoted_in_base_top5"] == 1.0
        assert s[part]["unshifted"] == 1.0
        assert s[part]["top1_agreement"] == 1.0
        assert s[part]["contrastive_gap"] == 0.0
    assert s["kl_ratio"] is None and s["kl_share_at_forks"] is None


def _ranked_row(V: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Base logits whose rank order is a fixed permutation of the vocabulary."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5))
    row = torch.empty(V)
    row[perm] = torch.arange(V, 0, -1, dtype=torch.float32)  # perm[0] is the base's top-1
    return row, perm


@pytest.mark.parametrize(
    ("base_rank", "expected_class"),
    [(2, RERANKED), (5, RERANKED), (6, SHIFTED), (7, SHIFTED), (12, SHIFTED)],
)
def test_shift_classes_from_planted_promotions(base_rank, expected_class):
    row, perm = _ranked_row()
    base = row.expand(1, 2, -1).clone()
    policy = base.clone()
    token = int(perm[base_rank - 1])
    policy[0, 1, token] += 20.0  # promote the base's rank-`base_rank` token at position 1
    out = position_movement(base, policy, torch.zeros(1, 2, dtype=torch.long), top_n=5)
    assert out["shift_class"].tolist() == [[UNSHIFTED, expected_class]]
    assert out["promoted_base_rank"].tolist() == [[1, base_rank]]
    assert out["top1_agree"].tolist() == [[True, False]]
    # a wider top_n moves the boundary
    wide = position_movement(base, policy, torch.zeros(1, 2, dtype=torch.long), top_n=12)
    assert wide["shift_class"][0, 1].item() == RERANKED


def test_ties_follow_argmax_consistently():
    # Base ties tokens 0 and 1 at the top: argmax picks 0; a policy preferring 1 changed
    # its argmax, and token 1 ranks 2nd under the base (ties broken by lower id).
    base = torch.tensor([[[5.0, 5.0, 0.0, 0.0], [1.0, 3.0, 3.0, 3.0]]])
    policy = torch.tensor([[[4.0, 5.0, 0.0, 0.0], [1.0, 3.0, 3.0, 3.0]]])
    out = position_movement(base, policy, torch.zeros(1, 2, dtype=torch.long))
    assert out["top1_agree"].tolist() == [[False, True]]
    assert out["promoted_base_rank"].tolist() == [[2, 1]]
    assert out["shift_class"].tolist() == [[RERANKED, UNSHIFTED]]
    policy2 = torch.tensor([[[5.0, 5.0, 0.0, 0.0], [1.0, 3.0, 3.0, 4.0]]])
    out2 = position_movement(base, policy2, torch.zeros(1, 2, dtype=torch.long))
    assert out2["top1_agree"].tolist() == [[True, False]]
    assert out2["promoted_base_rank"].tolist() == [[1, 3]]


def test_neg_inf_logits_stay_finite():
    V = 8
    base = _random_logits(6, (2, 3, V))
    policy = base + _random_logits(7, (2, 3, V))
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[1, 4, 6]] = True
    base[..., banned] = NEG_INF
    policy[..., banned] = NEG_INF
    base[1, 2] = NEG_INF  # a fully masked row in both
    policy[1, 2] = NEG_INF
    target = torch.zeros(2, 3, dtype=torch.long)
    for temperature in (1.0, 0.6):
        out = position_movement(base, policy, target, entropy_temperature=temperature)
        for key in ("kl", "js", "base_entropy", "base_logp", "policy_logp"):
            assert torch.isfinite(out[key][~torch.isneginf(base[..., 0])]).all(), key
            assert not torch.isnan(out[key]).any(), key
        assert out["kl"][1, 2] == 0 and out["js"][1, 2] == 0 and out["base_entropy"][1, 2] == 0
        live = ~banned
        ref = kl_divergence(Categorical(logits=base[:, :2][..., live]), Categorical(logits=policy[:, :2][..., live]))
        torch.testing.assert_close(out["kl"][:, :2], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            out["base_entropy"], token_entropy(base, temperature=temperature), atol=1e-5, rtol=1e-5
        )
        assert (out["promoted_base_rank"][:, :2] <= live.sum()).all()


def test_planted_logit_change_moves_exactly_there():
    base = _random_logits(8, (3, 6, 20))
    policy = base.clone()
    planted = [(0, 1, 3), (2, 4, 11), (1, 0, 7)]
    where = torch.zeros(3, 6, dtype=torch.bool)
    for b, t, v in planted:
        policy[b, t, v] += 10.0
        where[b, t] = True
    out = position_movement(base, policy, torch.zeros(3, 6, dtype=torch.long))
    assert (out["kl"][where] > 0).all()
    assert (out["kl"][~where] == 0).all()
    assert (out["js"][where] > 0).all()
    s = summarize({k: v.reshape(-1) for k, v in out.items()}, where.reshape(-1), torch.ones(18, dtype=torch.bool))
    assert s["nonfork"]["kl_mean"] == 0.0
    assert s["kl_ratio"] is None  # documented: a zero non-fork mean gives None, not inf
    assert s["kl_share_at_forks"] == 1.0
    assert s["fork_share_of_positions"] == pytest.approx(3 / 18)
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------------------
# summarize


def _random_per_position(seed: int, n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(0, 3, (n,), generator=gen).to(torch.int8)
    rank = torch.where(
        shift == UNSHIFTED,
        torch.ones(n, dtype=torch.long),
        torch.where(
            shift == RERANKED,
            torch.randint(2, 6, (n,), generator=gen),
            torch.randint(6, 30, (n,), generator=gen),
        ),
    )
    kl = torch.rand(n, generator=gen) * torch.randint(0, 2, (n,), generator=gen)  # many exact zeros
    return {
        "kl": kl,
        "js": torch.rand(n, generator=gen) * LN2,
        "base_entropy": torch.rand(n, generator=gen) * 3,
        "top1_agree": shift == UNSHIFTED,
        "shift_class": shift,
        "promoted_base_rank": rank,
        "base_logp": -torch.rand(n, generator=gen) * 5,
        "policy_logp": -torch.rand(n, generator=gen) * 5,
    }


def _brute_set(pp, idx, correct) -> dict:
    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    n = len(idx)
    cls = [int(pp["shift_class"][i]) for i in idx]
    rer, sh = cls.count(RERANKED), cls.count(SHIFTED)
    d = {i: float(pp["policy_logp"][i]) - float(pp["base_logp"][i]) for i in idx}
    dc = mean([d[i] for i in idx if correct[i]])
    dw = mean([d[i] for i in idx if not correct[i]])
    hist = {str(r): 0 for r in range(2, 11)}
    hist[">10"] = 0
    for i in idx:
        if cls[idx.index(i)] != UNSHIFTED:
            r = int(pp["promoted_base_rank"][i])
            hist[str(r) if r <= 10 else ">10"] += 1
    return {
        "kl_mean": mean([float(pp["kl"][i]) for i in idx]),
        "js_mean": mean([float(pp["js"][i]) for i in idx]),
        "top1_agreement": mean([float(bool(pp["top1_agree"][i])) for i in idx]),
        "unshifted": cls.count(UNSHIFTED) / n if n else None,
        "reranked": rer / n if n else None,
        "shifted": sh / n if n else None,
        "promoted_in_base_top5": (rer / (rer + sh) if rer + sh else 1.0) if n else None,
        "dlogp_correct": dc,
        "dlogp_wrong": dw,
        "contrastive_gap": dc - dw if dc is not None and dw is not None else None,
        "promoted_base_rank_hist": hist,
    }


def _assert_same(actual, expected):
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for k in expected:
            _assert_same(actual[k], expected[k])
    elif expected is None:
        assert actual is None
    elif isinstance(expected, int) and not isinstance(expected, bool):
        assert actual == expected
    else:
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("fork_kind", ["random", "empty", "all", "none_correct"])
def test_summarize_matches_python_aggregation(fork_kind):
    n = 300
    pp = _random_per_position(9, n)
    gen = torch.Generator().manual_seed(10)
    fork = torch.rand(n, generator=gen) < 0.15
    correct = torch.rand(n, generator=gen) < 0.5
    if fork_kind == "empty":
        fork[:] = False
    elif fork_kind == "all":
        fork[:] = True
    elif fork_kind == "none_correct":
        correct[:] = False
    s = summarize(pp, fork, correct)
    json.dumps(s, allow_nan=False)  # strict JSON: no nan/inf anywhere

    fork_idx = [i for i in range(n) if fork[i]]
    non_idx = [i for i in range(n) if not fork[i]]
    corr = [bool(c) for c in correct]
    exp_fork, exp_non = _brute_set(pp, fork_idx, corr), _brute_set(pp, non_idx, corr)
    _assert_same(s["fork"], exp_fork)
    _assert_same(s["nonfork"], exp_non)
    assert s["positions"] == {"fork": len(fork_idx), "nonfork": len(non_idx)}
    total = sum(float(pp["kl"][i]) for i in range(n))
    at_forks = sum(float(pp["kl"][i]) for i in fork_idx)
    assert s["kl_share_at_forks"] == pytest.approx(at_forks / total, rel=1e-9, abs=1e-12)
    assert s["fork_share_of_positions"] == pytest.approx(len(fork_idx) / n)
    if exp_fork["kl_mean"] is None or exp_non["kl_mean"] is None:
        assert s["kl_ratio"] is None
    else:
        assert s["kl_ratio"] == pytest.approx(exp_fork["kl_mean"] / exp_non["kl_mean"], rel=1e-9)
    for part in ("fork", "nonfork"):
        m = s[part]
        if s["positions"][part]:
            assert m["unshifted"] + m["reranked"] + m["shifted"] == pytest.approx(1.0)
            changed = sum(m["promoted_base_rank_hist"].values())
            assert changed == round((m["reranked"] + m["shifted"]) * s["positions"][part])
        else:
            assert all(m[k] is None for k in m if k != "promoted_base_rank_hist")
            assert sum(m["promoted_base_rank_hist"].values()) == 0
    if fork_kind == "none_correct":
        assert s["fork"]["dlogp_correct"] is None and s["fork"]["contrastive_gap"] is None
        assert s["fork"]["dlogp_wrong"] is not None


def test_summarize_with_no_positions_and_infinite_kl():
    pp = _random_per_position(11, 0)
    s = summarize(pp, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert s["positions"] == {"fork": 0, "nonfork": 0}
    assert s["kl_ratio"] is None and s["kl_share_at_forks"] is None and s["fork_share_of_positions"] is None
    json.dumps(s, allow_nan=False)
    pp = _random_per_position(12, 10)
    pp["kl"][3] = math.inf
    fork = torch.zeros(10, dtype=torch.bool)
    fork[3] = True
    s = summarize(pp, fork, torch.ones(10, dtype=torch.bool))
    assert s["fork"]["kl_mean"] is None and s["kl_ratio"] is None and s["kl_share_at_forks"] is None
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------------------
# deciles and overlap


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_deciles_cover_every_position_once_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 257
    h = torch.randint(0, 4, (n,), generator=gen).float() * 0.5  # 4 distinct values: many ties
    h[:5] = torch.rand(5, generator=gen)  # plus a few distinct ones
    kl = torch.rand(n, generator=gen)
    agree = torch.rand(n, generator=gen) < 0.7
    bins = entropy_deciles(h, kl, agree, n_bins=10)
    assert len(bins) == 10
    assert sum(b["n"] for b in bins) == n
    ref_edges = torch.quantile(h.double(), torch.linspace(0, 1, 11, dtype=torch.float64))
    for i, b in enumerate(bins):
        assert b["lo"] == pytest.approx(float(ref_edges[i])) and b["hi"] == pytest.approx(float(ref_edges[i + 1]))
    for j in range(n):
        x = float(h[j])
        homes = [
            i
            for i, b in enumerate(bins)
            if b["lo"] <= x < b["hi"] or (i == len(bins) - 1 and b["lo"] <= x <= b["hi"])
        ]
        assert len(homes) == 1, (x, homes)
    # per-bin means by brute force
    for i, b in enumerate(bins):
        members = [
            j
            for j in range(n)
            if b["lo"] <= float(h[j]) < b["hi"] or (i == 9 and b["lo"] <= float(h[j]) <= b["hi"])
        ]
        assert b["n"] == len(members)
        if members:
            assert b["kl_mean"] == pytest.approx(sum(float(kl[j]) for j in members) / len(members))
            assert b["top1_agreement"] == pytest.approx(sum(bool(agree[j]) for j in members) / len(members))
        else:
            assert b["kl_mean"] is None and b["top1_agreement"] is None
    json.dumps(bins, allow_nan=False)


def test_entropy_deciles_edge_cases():
    assert entropy_deciles(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == []
    same = entropy_deciles(torch.ones(7), torch.arange(7.0), torch.ones(7, dtype=torch.bool), n_bins=4)
    assert [b["n"] for b in same] == [0, 0, 0, 7]
    assert same[-1]["kl_mean"] == pytest.approx(3.0)


def test_high_entropy_overlap():
    gen = torch.Generator().manual_seed(13)
    h = torch.rand(2, 10, generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    assert high_entropy_overlap(h, h.clone(), mask, quantile=0.2) == 1.0
    # Disjoint: the base is high on the first half of each row, the policy on the second.
    base = torch.zeros(2, 10)
    policy = torch.zeros(2, 10)
    base[:, :2] = 5.0
    policy[:, 5:7] = 5.0
    assert high_entropy_overlap(base, policy, mask, quantile=0.2) == 0.0
    # Partial: base top {0,1,2,3}, policy top {2,3,4,5} of 20 positions -> 2 / 6.
    base = torch.zeros(20)
    policy = torch.zeros(20)
    base[[0, 1, 2, 3]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    policy[[2, 3, 4, 5]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    base[4:] = torch.linspace(1, 0, 16)
    policy[6:] = torch.linspace(1, 0, 14)
    policy[:2] = -1.0
    assert high_entropy_overlap(base, policy, torch.ones(20), quantile=0.2) == pytest.approx(2 / 6)
    # Masked positions never count, however high.
    m = torch.ones(20)
    m[[0, 1]] = 0
    base2 = base.clone()
    base2[[0, 1]] = 100.0
    policy2 = policy.clone()
    policy2[[0, 1]] = 100.0
    assert high_entropy_overlap(base2, policy2, m, quantile=0.2) == pytest.approx(
        high_entropy_overlap(base, policy, m, quantile=0.2)
    )
    assert high_entropy_overlap(h, h, torch.zeros(2, 10), quantile=0.2) is None


# ----------------------------------------------------------------------------------------
# movement_for_batch on a tiny PEFT model

PAD = 2


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # sharpen the random head so argmax and ranks are meaningful
        base.get_output_embeddings().weight.mul_(20.0)
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", r=4, lora_dropout=0.1))
    return model.eval()


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(14)
    prompt_lens, completion_lens = [3, 6, 4], [7, 2, 5]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    completions = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in completion_lens]
    return prompts, completions, pack_batch(prompts, completions, PAD)


@torch.no_grad()
def _reference_rows(model, prompts, completions):
    """Per row, per completion position: brute-force stats from two plain full forwards."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(ids.shape[1])[None])
        with model.disable_adapter():
            base = model(**kwargs).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]
        policy = model(**kwargs).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]
        target = torch.tensor(completion)
        rows.append(
            {
                "kl": kl_divergence(Categorical(logits=base), Categorical(logits=policy)),
                "base_entropy": Categorical(logits=base / 0.7).entropy(),
                "top1_agree": base.argmax(-1) == policy.argmax(-1),
                "base_logp": torch.log_softmax(base, -1).gather(-1, target[:, None])[:, 0],
                "policy_logp": torch.log_softmax(policy, -1).gather(-1, target[:, None])[:, 0],
                "js": torch.tensor(
                    [_brute_js(_probs(base[j]), _probs(policy[j])) for j in range(len(completion))]
                ),
            }
        )
    return rows


def test_movement_for_batch_zero_at_init(peft_model):
    vocab = peft_model.get_base_model().config.vocab_size
    _, _, batch = _batch(vocab)
    out = movement_for_batch(peft_model, batch, chunk_size=3, entropy_temperature=1.0)
    mask = batch["completion_mask"].bool()
    assert set(out) == set(MOVEMENT_KEYS)
    for value in out.values():
        assert value.shape == batch["completion_ids"].shape
    assert (out["kl"][mask].abs() < 1e-6).all()
    assert (out["js"][mask].abs() < 1e-6).all()
    assert out["top1_agree"][mask].all()
    assert (out["shift_class"][mask] == UNSHIFTED).all()
    # The base side agrees with scoring.score_batch run on the bare base model.
    with peft_model.disable_adapter():
        scored = score_batch(peft_model.get_base_model(), batch, top_k=0, chunk_size=4, entropy_temperature=1.0)
    torch.testing.assert_close(out["base_entropy"][mask], scored["entropy"][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["base_logp"][mask], scored["logp"][mask], atol=1e-5, rtol=1e-5)


def test_movement_for_batch_matches_full_forwards_after_perturbation(tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(20.0)
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", r=4, lora_dropout=0.5))
    gen = torch.Generator().manual_seed(15)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.train()  # movement_for_batch must switch dropout off and restore the mode
    vocab = base.config.vocab_size
    prompts, completions, batch = _batch(vocab)
    model.eval()
    refs = _reference_rows(model, prompts, completions)
    model.train()
    for chunk_size in (1, 4):
        out = movement_for_batch(model, batch, chunk_size=chunk_size, entropy_temperature=0.7)
        assert model.training
        for i, ref in enumerate(refs):
            n = len(completions[i])
            assert (ref["kl"] > 1e-4).any()  # the plant really moved the policy
            for key, expected in ref.items():
                got = out[key][i, :n]
                if key == "top1_agree":
                    assert torch.equal(got, expected), (chunk_size, i)
                else:
                    torch.testing.assert_close(
                        got, expected.float(), atol=2e-5, rtol=1e-4, msg=f"{key} {chunk_size} {i}"
                    )
        # the masked, flattened output feeds summarize and stays strict JSON
        mask = batch["completion_mask"].bool()
        flat = {k: v[mask] for k, v in out.items()}
        s = summarize(flat, flat["base_entropy"] > 1.0, torch.ones(int(mask.sum()), dtype=torch.bool))
        assert s["positions"]["fork"] + s["positions"]["nonfork"] == int(mask.sum())
        json.dumps(s, allow_nan=False)


def test_planted_change_on_tiny_model_logits(peft_model):
    """Base logits of the tiny model; the policy equals them except +10 on one token at chosen positions."""
    vocab = peft_model.get_base_model().config.vocab_size
    _, _, batch = _batch(vocab)
    C = batch["completion_ids"].shape[1]
    with torch.no_grad(), peft_model.disable_adapter():
        logits = peft_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[:, -C - 1 : -1]
    mask = batch["completion_mask"].bool()
    planted = torch.zeros_like(mask)
    planted[0, 2] = planted[1, 1] = planted[2, 4] = True
    policy = logits.clone()
    policy[planted] += 10.0 * torch.nn.functional.one_hot(torch.tensor([5, 77, 200]), vocab)
    out = position_movement(logits, policy, batch["completion_ids"], entropy_temperature=1.0)
    assert (out["kl"][planted] > 0).all()
    assert (out["kl"][~planted] == 0).all()
    flat = {k: v[mask] for k, v in out.items()}
    s = summarize(flat, planted[mask], torch.ones(int(mask.sum()), dtype=torch.bool))
    assert s["positions"]["fork"] == 3
    assert s["kl_ratio"] is None  # non-fork KL is exactly 0: None (documented), not inf
    assert s["kl_share_at_forks"] == 1.0
    assert s["nonfork"]["top1_agreement"] == 1.0 and s["nonfork"]["unshifted"] == 1.0
    assert s["fork"]["dlogp_correct"] is not None and s["fork"]["dlogp_wrong"] is None


def test_kl_share_high_entropy_is_the_kl_mass_at_the_top_fifth_by_base_entropy():
    import torch

    from reasonmaxxer.evaluation.movement import kl_share_high_entropy

    entropy = torch.arange(10, dtype=torch.float32)  # the top 20%: the positions of entropy 8 and 9
    kl = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 3.0, 1.0])
    assert kl_share_high_entropy(entropy, kl, quantile=0.2) == pytest.approx(4.0 / 5.0)
    assert kl_share_high_entropy(entropy, torch.zeros(10)) is None
    assert kl_share_high_entropy(torch.zeros(0), torch.zeros(0)) is None

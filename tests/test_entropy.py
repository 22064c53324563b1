"""Tests for reasonmaxxer.core.entropy and reasonmaxxer.core.gate against independent computations.

References used: torch.distributions.Categorical, brute-force Python loops in float64,
torch.quantile, and TRL's own GRPOTrainer.get_high_entropy_mask (the semantics of
``top_entropy_quantile`` that the quantile gate promises to reproduce).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical

from reasonmaxxer.core.entropy import token_entropy, token_stats
from reasonmaxxer.core.gate import GATE_MODES, fork_mask, quantile_threshold, random_positions

LN2 = math.log(2.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_entropy_row(row) -> float:
    """H of softmax(row) in float64 over the finite entries only, by a Python loop."""
    vals = [float(x) for x in row if math.isfinite(float(x))]
    if not vals:
        return 0.0
    m = max(vals)
    s = sum(math.exp(v - m) for v in vals)
    lse = m + math.log(s)
    h = 0.0
    for v in vals:
        lp = v - lse
        p = math.exp(lp)
        if p > 0:
            h -= p * lp
    return h


def _brute_entropy(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.detach().double().reshape(-1, logits.shape[-1])
    out = torch.tensor([_brute_entropy_row(r.tolist()) for r in flat], dtype=torch.float64)
    return out.reshape(logits.shape[:-1])


# --------------------------------------------------------------------------- token_entropy


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 1, 50)])
@pytest.mark.parametrize("unit", ["nats", "bits"])
def test_token_entropy_matches_categorical(shape, unit):
    logits = torch.randn(*shape, generator=_gen(0)) * 3.0
    got = token_entropy(logits, unit)
    ref = Categorical(logits=logits).entropy()
    if unit == "bits":
        ref = ref / LN2
    assert got.dtype == torch.float32
    assert got.shape == shape[:-1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_token_entropy_bits_is_nats_over_ln2_and_uniform_is_log_v():
    V = 16
    uniform = torch.zeros(4, V)
    torch.testing.assert_close(token_entropy(uniform), torch.full((4,), math.log(V)))
    torch.testing.assert_close(token_entropy(uniform, "bits"), torch.full((4,), 4.0))
    logits = torch.randn(2, 3, 9, generator=_gen(1))
    torch.testing.assert_close(token_entropy(logits, "bits"), token_entropy(logits) / LN2)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_token_entropy_temperature(temperature):
    logits = torch.randn(4, 6, 13, generator=_gen(2)) * 2.0
    got = token_entropy(logits, temperature=temperature)
    ref = Categorical(logits=logits / temperature).entropy()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and it really depends on the temperature (the test could fail)
    if temperature != 1.0:
        assert not torch.allclose(got, token_entropy(logits), atol=1e-3)


def test_token_entropy_minus_inf_logits_match_loop_over_finite_entries():
    logits = torch.randn(3, 4, 10, generator=_gen(3)) * 2.0
    drop = torch.rand(3, 4, 10, generator=_gen(4)) < 0.4
    drop[..., 0] = False  # keep at least one finite entry per row
    logits = logits.masked_fill(drop, float("-inf"))
    got = token_entropy(logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _brute_entropy(logits), atol=1e-5, rtol=1e-5)
    got_t = token_entropy(logits, "bits", temperature=0.6)
    torch.testing.assert_close(
        got_t.double(), _brute_entropy(logits / 0.6) / LN2, atol=1e-5, rtol=1e-5
    )


def test_token_entropy_all_minus_inf_row_is_zero_and_one_hot_row_is_exactly_zero():
    V = 8
    logits = torch.randn(4, V, generator=_gen(5))
    logits[0] = float("-inf")  # fully masked row
    logits[1] = float("-inf")
    logits[1, 3] = 0.0  # one-hot-like, the one logit at 0
    logits[2] = float("-inf")
    logits[2, 5] = 3.7  # one-hot-like, the one logit not at 0
    for unit in ("nats", "bits"):
        for temperature in (1.0, 0.6):
            h = token_entropy(logits, unit, temperature=temperature)
            assert torch.isfinite(h).all()
            assert h[0].item() == 0.0
            assert h[1].item() == 0.0
            assert h[2].item() == 0.0
            assert h[3].item() > 0.1  # the ordinary row is untouched


def test_token_entropy_bf16_input_gives_fp32_close_to_fp32_result():
    logits = torch.randn(2, 5, 64, generator=_gen(6)) * 2.0
    got = token_entropy(logits.bfloat16())
    assert got.dtype == torch.float32
    # exactly the fp32 entropy of the bf16-rounded logits ...
    torch.testing.assert_close(got, token_entropy(logits.bfloat16().float()), atol=1e-6, rtol=0)
    # ... and close to the fp32 entropy of the original logits (bf16 rounding only)
    torch.testing.assert_close(got, token_entropy(logits), atol=3e-2, rtol=1e-2)


def test_token_entropy_large_logits_stay_finite_and_correct():
    g = _gen(7)
    logits = torch.where(torch.rand(3, 4, 20, generator=g) < 0.5, -1e4, 1e4)
    logits[0, 0] = -1e4
    logits[0, 0, 2] = 1e4  # exactly one winner: H = 0
    logits[0, 1] = -1e4  # all equal: H = log V
    logits = logits + torch.randn(3, 4, 20, generator=g)  # ties broken by O(1) noise
    for temperature in (1.0, 0.6):
        h = token_entropy(logits, temperature=temperature)
        assert torch.isfinite(h).all()
        assert (h >= 0).all()
        # the brute force is float64 on the same fp32 logits: fp32 rounding only
        torch.testing.assert_close(
            h.double(), _brute_entropy(logits / temperature), atol=2e-5, rtol=0
        )


@pytest.mark.parametrize("offset", [0.0, 10.0, 100.0, 1e3, 3e3, 1e4, -1e4])
def test_entropy_at_large_offsets_matches_float64_of_the_same_logits(offset):
    """Every entropy path against torch.distributions in float64, on the very fp32 logits it got.

    The reference sees the same (rounded) inputs, so the only error left is the
    function's own: at offset 1e4 subtracting logsumexp(z) directly rounds at ulp(1e4)
    ~ 1e-3 nats; shifted by the row max first it stays at fp32's ~1e-6 of O(1) values.
    """
    logits = (torch.randn(8, 16, 300, generator=_gen(71)) * 3 + offset).float()
    want = Categorical(logits=logits.double()).entropy()
    for got in (token_entropy(logits), token_stats(logits, torch.zeros(8, 16, dtype=torch.long))["entropy"]):
        assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("offset", [30.0, 1e3, -1e4, 1e4])
def test_token_entropy_is_shift_invariant(offset):
    """softmax(z + c) = softmax(z): the entropy must not move when all logits shift.

    LM logits routinely carry a common offset; masked vocabularies are often filled with
    a large finite negative value. The fp32 error should stay at the rounding level of
    |z| (~ulp(1e4) = 1e-3), not grow with it.
    """
    logits = torch.randn(4, 6, 50, generator=_gen(70)) * 2.0
    ref = token_entropy(logits)
    shifted = token_entropy(logits + offset)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, ref, atol=5e-3, rtol=0)
    torch.testing.assert_close(
        token_entropy(logits + offset, temperature=0.6),
        token_entropy(logits, temperature=0.6),
        atol=1e-2,
        rtol=0,
    )
    # never above log V
    assert (shifted <= math.log(50) + 5e-3).all()


def test_token_entropy_rejects_unknown_unit():
    with pytest.raises(ValueError):
        token_entropy(torch.zeros(3), "dits")


# --------------------------------------------------------------------------- token_stats


def test_token_stats_matches_brute_force():
    B, T, V, K = 3, 5, 17, 4
    logits = torch.randn(B, T, V, generator=_gen(8)) * 2.5
    targets = torch.randint(0, V, (B, T), generator=_gen(9))
    out = token_stats(logits, targets, top_k=K)
    logp_all = torch.log_softmax(logits.double(), -1)
    # logp of the target, by a loop over positions
    for b in range(B):
        for t in range(T):
            assert out["logp"][b, t].item() == pytest.approx(
                logp_all[b, t, targets[b, t]].item(), abs=1e-5
            )
    torch.testing.assert_close(out["entropy"], Categorical(logits=logits).entropy(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], token_entropy(logits), atol=1e-5, rtol=1e-5)
    ref = torch.topk(torch.log_softmax(logits, -1), K, dim=-1)
    torch.testing.assert_close(out["topk_logp"], ref.values, atol=1e-6, rtol=1e-6)
    assert torch.equal(out["topk_ids"], ref.indices)
    assert out["topk_logp"].shape == (B, T, K) and out["topk_ids"].shape == (B, T, K)
    assert (out["topk_logp"][..., :-1] >= out["topk_logp"][..., 1:]).all()


def test_token_stats_entropy_temperature_and_logp_scale():
    logits = torch.randn(2, 6, 23, generator=_gen(10)) * 2.0
    targets = torch.randint(0, 23, (2, 6), generator=_gen(11))
    out = token_stats(logits, targets, entropy_temperature=0.6)
    torch.testing.assert_close(out["entropy"], token_entropy(logits, temperature=0.6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out["entropy"], Categorical(logits=logits / 0.6).entropy(), atol=1e-5, rtol=1e-5
    )
    # log-probs stay at temperature 1 whatever the entropy temperature
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["logp"], ref_logp, atol=1e-6, rtol=1e-6)
    assert "topk_logp" not in out and "topk_ids" not in out


def test_token_stats_minus_inf_logits_and_top_k_above_vocab():
    V = 9
    logits = torch.randn(2, 3, V, generator=_gen(12))
    logits[..., 6:] = float("-inf")
    targets = torch.randint(0, 6, (2, 3), generator=_gen(13))
    out = token_stats(logits, targets, top_k=V + 5)
    assert torch.isfinite(out["entropy"]).all() and torch.isfinite(out["logp"]).all()
    torch.testing.assert_close(out["entropy"].double(), _brute_entropy(logits), atol=1e-5, rtol=1e-5)
    assert out["topk_logp"].shape[-1] == V
    ref = torch.topk(torch.log_softmax(logits, -1), V, dim=-1)
    torch.testing.assert_close(out["topk_logp"], ref.values)


def test_token_stats_bf16_logits():
    logits = torch.randn(2, 4, 32, generator=_gen(14)) * 2.0
    targets = torch.randint(0, 32, (2, 4), generator=_gen(15))
    out = token_stats(logits.bfloat16(), targets, top_k=3)
    assert out["entropy"].dtype == torch.float32 and out["logp"].dtype == torch.float32
    ref = token_stats(logits.bfloat16().float(), targets, top_k=3)
    for key in ("entropy", "logp", "topk_logp"):
        torch.testing.assert_close(out[key], ref[key])


# --------------------------------------------------------------------------- fork_mask: threshold


def test_fork_mask_threshold_is_strict_and_ignores_padding():
    tau = 1.5
    above = torch.nextafter(torch.tensor(1.5), torch.tensor(2.0)).item()  # next float32
    entropy = torch.tensor(
        [
            [1.5, above, 1.4, 2.0, 50.0, 1e6],
            [0.0, 1.5, 3.0, 1.2, 1e6, float("inf")],
        ]
    )
    comp = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    got = fork_mask(entropy, comp, mode="threshold", tau=tau)
    expected = torch.tensor(
        [
            [False, True, False, True, False, False],
            [False, False, True, False, False, False],
        ]
    )
    assert got.dtype == torch.bool
    assert torch.equal(got, expected)
    # the paper's default and a float32 tie at 1.4
    e14 = torch.tensor([[1.4, 1.41, 1.39]])
    assert fork_mask(e14, torch.ones(1, 3), mode="threshold", tau=1.4).tolist() == [[False, True, False]]


def test_fork_mask_threshold_vs_loop_random():
    g = _gen(16)
    entropy = torch.rand(4, 9, generator=g) * 3
    comp = (torch.rand(4, 9, generator=g) < 0.7).long()
    entropy[comp == 0] = 100.0  # huge entropy at prompt/padding must never gate
    got = fork_mask(entropy, comp, mode="threshold", tau=1.4)
    for b in range(4):
        for t in range(9):
            assert bool(got[b, t]) == (bool(comp[b, t]) and entropy[b, t].item() > 1.4)


def test_fork_mask_threshold_no_fork_and_tau_zero():
    entropy = torch.rand(3, 5, generator=_gen(17)) * 0.9 + 0.05
    comp = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    none = fork_mask(entropy, comp, mode="threshold", tau=1.4)
    assert not none.any()
    every = fork_mask(entropy, comp, mode="threshold", tau=0.0)
    assert torch.equal(every, comp.bool())


# --------------------------------------------------------------------------- fork_mask: quantile


def _trl_get_high_entropy_mask():
    """TRL's own ``GRPOTrainer.get_high_entropy_mask`` (the unbound method).

    Importing ``trl.trainer.grpo_trainer`` pulls in transformers (~6 s on these machines),
    more than this whole file may take. Unless TRL is already imported (or
    RM_TEST_IMPORT_TRL=1), the method is compiled from the installed TRL's source file
    instead: the same code, verbatim, found with ``ast`` in ``class GRPOTrainer``. It needs
    only ``torch`` and ``self.accelerator``.
    """
    if "trl.trainer.grpo_trainer" in sys.modules or os.environ.get("RM_TEST_IMPORT_TRL") == "1":
        from trl.trainer.grpo_trainer import GRPOTrainer

        return GRPOTrainer.get_high_entropy_mask
    spec = importlib.util.find_spec("trl")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "trl is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "trainer" / "grpo_trainer.py"
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "GRPOTrainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "get_high_entropy_mask":
                    assert not item.decorator_list
                    module = ast.Module(body=[item], type_ignores=[])
                    namespace = {"torch": torch}
                    exec(compile(module, str(path), "exec"), namespace)
                    return namespace["get_high_entropy_mask"]
    raise AssertionError(f"GRPOTrainer.get_high_entropy_mask not found in {path}")


@pytest.fixture(scope="module")
def trl_mask():
    fn = _trl_get_high_entropy_mask()
    fake_self = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(
            pad_across_processes=lambda t, dim=0, pad_index=0: t,
            gather=lambda t: t,
        )
    )

    def call(entropies, mask, rho):
        return fn(fake_self, entropies, mask, 1 - rho)

    return call


def _random_batch(seed, B=5, T=12, ties=False):
    g = _gen(seed)
    entropy = torch.rand(B, T, generator=g) * 4.0
    if ties:
        entropy = torch.round(entropy * 2) / 2  # values on a 0.5 grid: many exact ties
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    starts = torch.randint(0, 3, (B,), generator=g)
    comp = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        comp[b, starts[b] : min(T, starts[b] + lengths[b])] = 1
    entropy = torch.where(comp.bool(), entropy, torch.full_like(entropy, 7.5))  # high at pad
    return entropy, comp


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fork_mask_quantile_equals_trl(trl_mask, rho, seed):
    entropy, comp = _random_batch(100 + seed)
    got = fork_mask(entropy, comp, mode="quantile", quantile=rho)
    ref = trl_mask(entropy, comp, rho)
    assert got.dtype == torch.bool
    assert torch.equal(got, ref)
    assert not (got & ~comp.bool()).any()
    n_valid = int(comp.sum())
    assert got.sum() >= max(1, math.floor(rho * n_valid) - 1)
    if rho == 1.0:
        assert torch.equal(got, comp.bool())


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fork_mask_quantile_ties_equal_trl(trl_mask, rho, seed):
    entropy, comp = _random_batch(200 + seed, B=6, T=16, ties=True)
    got = fork_mask(entropy, comp, mode="quantile", quantile=rho)
    assert torch.equal(got, trl_mask(entropy, comp, rho))
    # ties at the cut are included: any completion token equal to a gated one is gated
    gated_vals = set(entropy[got].tolist())
    for v, c, m in zip(entropy.flatten().tolist(), comp.flatten().tolist(), got.flatten().tolist()):
        if c and v in gated_vals:
            assert m


def test_fork_mask_quantile_all_equal_entropies_gate_everything(trl_mask):
    entropy = torch.full((3, 4), 0.7)
    comp = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    got = fork_mask(entropy, comp, mode="quantile", quantile=0.2)
    assert torch.equal(got, comp.bool())
    assert torch.equal(got, trl_mask(entropy, comp, 0.2))


def test_fork_mask_quantile_exact_cut_hand_made():
    # 10 completion tokens 0..9; 0.8 linear quantile = 7.2 -> tokens 8 and 9
    entropy = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100]])
    comp = torch.ones(1, 11, dtype=torch.long)
    comp[0, -1] = 0
    got = fork_mask(entropy, comp, mode="quantile", quantile=0.2)
    assert got[0].nonzero().flatten().tolist() == [8, 9]
    # 5 completion tokens 0..4; the 0.75 quantile is exactly 3.0: 3 is included (>=)
    e2 = torch.tensor([[0.0, 1, 2, 3, 4]])
    assert fork_mask(e2, torch.ones(1, 5), mode="quantile", quantile=0.25)[0].tolist() == [
        False, False, False, True, True
    ]


def test_fork_mask_quantile_empty_completion_is_all_false(trl_mask):
    entropy = torch.rand(2, 5, generator=_gen(18)) + 5
    comp = torch.zeros(2, 5, dtype=torch.long)
    got = fork_mask(entropy, comp, mode="quantile", quantile=0.2)
    assert got.dtype == torch.bool and got.shape == (2, 5) and not got.any()
    assert torch.equal(got, trl_mask(entropy, comp, 0.2))
    assert quantile_threshold(entropy, comp, 0.2) is None


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5])
def test_fork_mask_quantile_two_process_gather(trl_mask, rho):
    entropy, comp = _random_batch(300, B=6, T=10)
    entropy[3:] += 1.5  # the two ranks see different entropies, so pooling matters
    whole = fork_mask(entropy, comp, mode="quantile", quantile=rho)
    halves = [(entropy[:3], comp[:3]), (entropy[3:], comp[3:])]
    valid = [e[c.bool()].float() for e, c in halves]
    parts = []
    for rank, (e, c) in enumerate(halves):
        other = valid[1 - rank]
        gather = lambda local, other=other, rank=rank: (
            torch.cat([local, other]) if rank == 0 else torch.cat([other, local])
        )
        parts.append(fork_mask(e, c, mode="quantile", quantile=rho, gather=gather))
    assert torch.equal(torch.cat(parts), whole)
    # the local-only gate differs (otherwise the gather would be untested)
    local_only = torch.cat([fork_mask(e, c, mode="quantile", quantile=rho) for e, c in halves])
    assert torch.equal(whole, trl_mask(entropy, comp, rho))
    assert not torch.equal(local_only, whole)


def test_fork_mask_quantile_two_process_matches_trl_with_padding_sentinel():
    """TRL pads each rank's entropies with -1e9, gathers, drops the sentinel."""
    fn = _trl_get_high_entropy_mask()
    entropy, comp = _random_batch(301, B=6, T=10)
    halves = [(entropy[:3], comp[:3]), (entropy[3:], comp[3:])]
    valid = [e[c.bool()].float() for e, c in halves]
    width = max(v.numel() for v in valid)

    def pad(t, dim=0, pad_index=0):
        return torch.cat([t, torch.full((width - t.numel(),), float(pad_index))])

    for rank, (e, c) in enumerate(halves):
        other = pad(valid[1 - rank], dim=0, pad_index=-1e9)  # what the other rank sends
        fake_self = types.SimpleNamespace(
            accelerator=types.SimpleNamespace(
                pad_across_processes=pad, gather=lambda t, other=other: torch.cat([t, other])
            )
        )
        ref = fn(fake_self, e, c, 1 - 0.2)
        got = fork_mask(
            e, c, mode="quantile", quantile=0.2,
            gather=lambda local, o=valid[1 - rank]: torch.cat([local, o]),
        )
        assert torch.equal(got, ref)


def test_quantile_threshold_vs_torch_quantile():
    g = _gen(19)
    entropy = torch.rand(7, 13, generator=g) * 3
    comp = torch.rand(7, 13, generator=g) < 0.6
    for q in (0.05, 0.2, 0.37, 0.5, 0.9, 1.0):
        got = quantile_threshold(entropy, comp, q)
        ref = torch.quantile(entropy[comp], 1 - q)
        assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    # with a gather, the pooled values are used
    extra = torch.tensor([10.0, 11.0, 12.0])
    got = quantile_threshold(entropy, comp, 0.2, gather=lambda t: torch.cat([t, extra]))
    ref = torch.quantile(torch.cat([entropy[comp], extra]), 0.8)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    # a single completion token: the threshold is its entropy
    one = torch.zeros(7, 13, dtype=torch.bool)
    one[2, 4] = True
    assert quantile_threshold(entropy, one, 0.2).item() == entropy[2, 4].item()


# --------------------------------------------------------------------------- fork_mask: topk


def _brute_topk(entropy, comp, k):
    B, T = entropy.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        pos = [t for t in range(T) if comp[b, t]]
        pos.sort(key=lambda t: entropy[b, t].item(), reverse=True)
        for t in pos[:k]:
            out[b, t] = True
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 12, 40])
def test_fork_mask_topk_vs_brute_force(k):
    entropy, comp = _random_batch(400 + k, B=6, T=12)
    entropy = torch.where(comp.bool(), entropy, torch.full_like(entropy, 1e6))  # huge at pad
    got = fork_mask(entropy, comp, mode="topk", k=k)
    assert got.dtype == torch.bool
    assert torch.equal(got, _brute_topk(entropy, comp, k))
    assert torch.equal(got.sum(-1), torch.clamp(comp.sum(-1), max=k))


def test_fork_mask_topk_short_sequences_and_one_token_completions():
    entropy = torch.tensor(
        [
            [9.0, 9.0, 0.1, 0.2, 9.0, 9.0],  # completion: positions 2, 3 only (< k)
            [9.0, 9.0, 9.0, 0.5, 9.0, 9.0],  # one-token completion at 3
            [0.3, 0.1, 0.2, 0.9, 0.8, 0.4],  # full completion
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # no completion at all
        ]
    )
    comp = torch.tensor(
        [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    )
    got = fork_mask(entropy, comp, mode="topk", k=3)
    expected = torch.tensor(
        [
            [False, False, True, True, False, False],
            [False, False, False, True, False, False],
            [False, False, False, True, True, True],
            [False] * 6,
        ]
    )
    assert torch.equal(got, expected)
    # k larger than T
    assert torch.equal(fork_mask(entropy, comp, mode="topk", k=100), comp.bool())
    # T == 1
    e1 = torch.tensor([[0.5], [2.0]])
    c1 = torch.tensor([[1], [0]])
    assert fork_mask(e1, c1, mode="topk", k=4).tolist() == [[True], [False]]


def test_fork_mask_topk_ties_pick_exactly_k_of_the_highest():
    entropy = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0]])
    comp = torch.tensor([[1, 1, 1, 1, 1, 0, 1]])
    got = fork_mask(entropy, comp, mode="topk", k=3)
    assert got.sum().item() == 3
    assert got[0, 6] and not got[0, 5]  # the top one in, padding out
    assert got[0, 1:4].sum().item() == 2
    sel = entropy[got]
    rest = entropy[comp.bool() & ~got]
    assert sel.min() >= rest.max()


# --------------------------------------------------------------------------- fork_mask: all, errors


def test_fork_mask_all_equals_completion_mask():
    entropy, comp = _random_batch(500)
    got = fork_mask(entropy, comp, mode="all")
    assert got.dtype == torch.bool and torch.equal(got, comp.bool())
    got_f = fork_mask(entropy, comp.float(), mode="all")
    assert torch.equal(got_f, comp.bool())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="threshold"),
        dict(mode="quantile"),
        dict(mode="quantile", quantile=0.0),
        dict(mode="quantile", quantile=1.5),
        dict(mode="quantile", quantile=-0.2),
        dict(mode="topk"),
        dict(mode="topk", k=0),
        dict(mode="topk", k=-3),
        dict(mode="bogus"),
    ],
)
def test_fork_mask_invalid_args_raise(kwargs):
    entropy, comp = _random_batch(600)
    with pytest.raises(ValueError):
        fork_mask(entropy, comp, **kwargs)


def test_gate_modes_listed():
    assert set(GATE_MODES) == {"threshold", "quantile", "topk", "all", "random"}


# ----------------------------------------------------------------------------- random control gate


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(5, 12, generator=g) * 3
    lengths = torch.tensor([12, 7, 1, 0, 4])
    mask = torch.arange(12).unsqueeze(0) < lengths.unsqueeze(1)
    entropy[~mask] = 100.0  # padding with huge entropy must never be drawn
    return entropy, mask


@pytest.mark.parametrize("reference, kwargs", [("threshold", {"tau": 1.4}), ("quantile", {"quantile": 0.3}),
                                               ("topk", {"k": 3})])
def test_random_gate_matches_the_reference_count_per_sequence(reference, kwargs):
    entropy, mask = _padded_batch()
    ref = fork_mask(entropy, mask, mode=reference, **kwargs)
    for seed in range(20):
        rnd = fork_mask(entropy, mask, mode="random", reference=reference,
                        generator=torch.Generator().manual_seed(seed), **kwargs)
        assert torch.equal(rnd.sum(-1), ref.sum(-1))  # exactly the same count, row by row
        assert not (rnd & ~mask).any()  # never padding or prompt


def test_random_gate_is_seeded_and_uniform():
    entropy, mask = _padded_batch()
    a = fork_mask(entropy, mask, mode="random", tau=1.4, generator=torch.Generator().manual_seed(3))
    b = fork_mask(entropy, mask, mode="random", tau=1.4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Row 0 has 12 completion positions and draws `count` of them: each position is picked
    # with probability count / 12 (brute-force frequency over many draws).
    counts = torch.tensor([4])
    row_mask = torch.ones(1, 12, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(12)
    draws = 6000
    for _ in range(draws):
        hits += random_positions(counts, row_mask, g)[0].float()
    assert torch.allclose(hits / draws, torch.full((12,), 4 / 12), atol=0.025)


def test_random_gate_rejects_a_bad_reference():
    entropy, mask = _padded_batch()
    with pytest.raises(ValueError, match="reference"):
        fork_mask(entropy, mask, mode="random", reference="all", tau=1.0)


# --------------------------------------------------------------------------- non-finite logits


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logits_give_nan_entropy_not_zero(bad, temperature):
    """A broken row must not look certain (entropy 0 would make it 'never a fork')."""
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 1.0], [float("-inf"), 0.0, 1.0], [float("-inf")] * 3])
    h = token_entropy(z, temperature=temperature)
    stats = token_stats(z.unsqueeze(0), torch.zeros(1, 4, dtype=torch.long), entropy_temperature=temperature)
    for got in (h, stats["entropy"][0]):
        assert torch.isnan(got[1])
        # finite rows, -inf (masked vocabulary) included, keep their finite entropy
        want = Categorical(logits=z[:3:2] / temperature).entropy()
        torch.testing.assert_close(got[:3:2], want)
        assert got[3] == 0.0  # a fully masked row: no distribution, entropy 0


# --------------------------------------------------------------------------- threshold: tau_pos / tau_neg


def test_threshold_per_row_taus_against_a_loop():
    entropy = torch.rand(4, 9, generator=_gen(5)) * 3
    comp = torch.ones(4, 9)
    comp[1, 6:] = 0
    positive = torch.tensor([True, False, True, False])
    got = fork_mask(entropy, comp, mode="threshold", tau=1.4, tau_pos=2.0, tau_neg=0.8, positive=positive)
    for b in range(4):
        cut = 2.0 if positive[b] else 0.8
        for t in range(9):
            assert bool(got[b, t]) == (bool(comp[b, t]) and float(entropy[b, t]) > cut)
    # random matches the per-row counts of that gate
    rnd = fork_mask(entropy, comp, mode="random", tau=1.4, tau_pos=2.0, tau_neg=0.8, positive=positive,
                    generator=_gen(0))
    assert torch.equal(rnd.sum(-1), got.sum(-1))
    with pytest.raises(ValueError, match="positive"):
        fork_mask(entropy, comp, mode="threshold", tau=1.4, tau_pos=2.0)
    # equal taus need no per-row sign: the old signature still works
    assert torch.equal(fork_mask(entropy, comp, mode="threshold", tau=1.4, tau_pos=1.4),
                       fork_mask(entropy, comp, mode="threshold", tau=1.4))


# --------------------------------------------------------------------------- quantile: TRL's float32 rank


def test_quantile_gate_tie_rule_against_torch_quantile():
    """The documented rule (quantile_threshold's docstring) next to TRL's.

    TRL's get_high_entropy_mask: cut = torch.quantile(entropies.float(), 1 - q), forks are
    entropies >= cut. Ours forms the rank (1 - q) * (N - 1) in float64: for q 0.28 and N 76
    it is exactly 54, so the 55th smallest value is the cut and is kept. torch.quantile
    formed that rank in float32 in torch 2.13 (a little above 54: the cut lies above the
    55th value, which TRL leaves out); torch 2.14 forms it as we do. Whichever this torch
    does, the two masks differ at most in that one token, exactly when torch's cut is above it.
    """
    entropy = torch.arange(76, dtype=torch.float32).reshape(1, -1) / 10
    comp = torch.ones_like(entropy)
    q = 0.28
    torch_cut = torch.quantile(entropy.float(), 1 - q)
    trl = entropy >= torch_cut
    ours = fork_mask(entropy, comp, mode="quantile", quantile=q)
    rank = (1 - q) * (76 - 1)  # Python float64
    assert rank == 54.0
    assert int(ours.sum()) == 76 - 54 == 22 and ours[0, 54]
    assert torch.equal(ours[0, 55:], trl[0, 55:]) and not trl[0, :54].any()
    torch_rounds_up = bool(torch_cut > entropy[0, 54])
    assert bool(trl[0, 54]) == (not torch_rounds_up)
    assert int(trl.sum()) == (21 if torch_rounds_up else 22)

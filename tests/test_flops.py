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


def test_base_parameter_count_leaves_lora_out_and_counts_a_tied_tensor_once(tiny_model_dir):
    import peft

    from reasonmaxxer.models.loading import load_model
    from reasonmaxxer.utils.flops import base_parameter_count

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    by_hand = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert base_parameter_count(model) == by_hand
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert base_parameter_count(wrapped) == by_hand

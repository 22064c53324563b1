"""reasonmaxxer.movement: eval's movement on any two models, against a brute-force loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import reasonmaxxer as rm
from reasonmaxxer.data.rows import tokenize_rollout
from reasonmaxxer.errors import DataError


def _models(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return tokenizer, base, peft.eval()


def _rows(tokenizer):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(5):
        prompt = torch.randint(10, 300, (3 + i,), generator=gen).tolist()
        completion = torch.randint(10, 300, (1 + 2 * i,), generator=gen).tolist()  # one-token completion first
        rows.append({"prompt_ids": prompt, "completion_ids": completion, "reward": float(i % 2)})
    return rows


def _brute(base, policy, rows, tau):
    """Per position: full forward of each model, KL and entropy from torch.distributions."""
    kls, forks, agree = [], [], []
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        P, C = len(r["prompt_ids"]), len(r["completion_ids"])
        with torch.no_grad():
            b = base(ids).logits[0, P - 1 : P + C - 1].double()
            p = policy(ids).logits[0, P - 1 : P + C - 1].double()
        for t in range(C):
            kls.append(float(kl_divergence(Categorical(logits=b[t]), Categorical(logits=p[t]))))
            forks.append(float(Categorical(logits=b[t]).entropy()) > tau)
            agree.append(bool(b[t].argmax() == p[t].argmax()))
    return kls, forks, agree


def _median_tau(base, rows):
    """A threshold between the two middle base entropies: about half the positions are forks, none at tau."""
    ent = []
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        P, C = len(r["prompt_ids"]), len(r["completion_ids"])
        with torch.no_grad():
            ent += Categorical(logits=base(ids).logits[0, P - 1 : P + C - 1].double()).entropy().tolist()
    ent = sorted(ent)
    return (ent[len(ent) // 2 - 1] + ent[len(ent) // 2]) / 2


def _mean(xs):
    return sum(xs) / len(xs)


def test_movement_of_a_peft_model_and_of_its_merged_copy_equal_the_brute_force(tiny_model_dir):
    tokenizer, base, peft = _models(tiny_model_dir)
    rows = _rows(tokenizer)
    merged = copy.deepcopy(peft).merge_and_unload().eval()
    tau = _median_tau(base, rows)
    kls, forks, agree = _brute(base, merged, rows, tau)
    assert 0 < sum(forks) < len(forks)
    fork_kl = _mean([k for k, f in zip(kls, forks) if f])
    nonfork_kl = _mean([k for k, f in zip(kls, forks) if not f])
    for report in (rm.movement(peft, tokenizer, rows, tau=tau, batch_size=2, chunk_size=3),
                   rm.movement(merged, tokenizer, rows, base_model=base, tau=tau, batch_size=4)):
        assert report["positions"] == {"fork": sum(forks), "nonfork": len(forks) - sum(forks)}
        assert report["fork"]["kl_mean"] == pytest.approx(fork_kl, rel=1e-4, abs=1e-6)
        assert report["nonfork"]["kl_mean"] == pytest.approx(nonfork_kl, rel=1e-4, abs=1e-6)
        assert report["kl_ratio"] == pytest.approx(fork_kl / nonfork_kl, rel=1e-4)
        assert report["fork"]["top1_agreement"] == pytest.approx(_mean([a for a, f in zip(agree, forks) if f]))
        assert report["rollouts"] == len(rows)
    assert peft.training is False  # the mode it was in


def test_a_model_against_itself_has_not_moved(tiny_model_dir):
    tokenizer, base, _ = _models(tiny_model_dir)
    report = rm.movement(base, tokenizer, _rows(tokenizer), base_model=base, mode="quantile", quantile=0.3)
    for side in ("fork", "nonfork"):
        assert report[side]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
        assert report[side]["top1_agreement"] == 1.0


def test_no_fork_and_all_forks(tiny_model_dir):
    """A gate that picks nothing (or everything) leaves the other side's statistics None, never NaN."""
    tokenizer, base, peft = _models(tiny_model_dir)
    rows = _rows(tokenizer)
    kls, _, _ = _brute(base, copy.deepcopy(peft).merge_and_unload().eval(), rows, tau=0.0)
    none = rm.movement(peft, tokenizer, rows, tau=1e6)
    every = rm.movement(peft, tokenizer, rows, tau=-1.0)
    assert none["positions"] == {"fork": 0, "nonfork": len(kls)} and none["fork"]["kl_mean"] is None
    assert every["positions"] == {"fork": len(kls), "nonfork": 0} and every["nonfork"]["kl_mean"] is None
    assert none["kl_ratio"] is None and every["kl_ratio"] is None
    assert none["nonfork"]["kl_mean"] == pytest.approx(_mean(kls), rel=1e-4)
    assert every["fork"]["kl_mean"] == pytest.approx(_mean(kls), rel=1e-4) and every["kl_share_at_forks"] == 1.0


def test_a_bf16_adapter_matches_float64_on_the_same_weights(tiny_model_dir):
    """In bf16 the reductions run in fp32: the KL stays near float64's on the same bf16 weights."""
    tokenizer, _, peft = _models(tiny_model_dir)
    rows = _rows(tokenizer)
    peft16 = copy.deepcopy(peft).to(torch.bfloat16)
    base64 = copy.deepcopy(peft16).unload().double().eval()
    merged64 = copy.deepcopy(peft16).merge_and_unload().double().eval()
    kls, _, agree = _brute(base64, merged64, rows, tau=0.0)
    report = rm.movement(peft16, tokenizer, rows, tau=-1.0)  # every position a fork: one mean over all
    # bf16 activations between the layers (8 mantissa bits) and a bf16-rounded merge: within 10%
    assert report["fork"]["kl_mean"] == pytest.approx(_mean(kls), rel=0.1)
    assert report["fork"]["top1_agreement"] == pytest.approx(_mean(agree), abs=0.1)


def test_rows_standard_and_conversational_tokenize_as_trl_would(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    p, c = tokenize_rollout(tokenizer, {"prompt": "What is 2 + 3?", "completion": " 5"})
    assert p == tokenizer("What is 2 + 3?").input_ids and c == tokenizer(" 5", add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    answer = [{"role": "assistant", "content": "5"}]
    p, c = tokenize_rollout(tokenizer, {"prompt": messages, "completion": answer})
    full = tokenizer.apply_chat_template(messages + answer, tokenize=True, return_dict=False)
    assert p + c == list(full) and p == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=True, return_dict=False))
    with pytest.raises(DataError, match="row 3: needs 'prompt' and 'completion'"):
        tokenize_rollout(tokenizer, {"text": "x"}, 3)
    with pytest.raises(DataError, match="row 0: 'prompt' and 'completion' must both be text"):
        tokenize_rollout(tokenizer, {"prompt": "x", "completion": answer})


def test_bad_calls_say_what_is_wrong(tiny_model_dir):
    tokenizer, base, _ = _models(tiny_model_dir)
    with pytest.raises(ValueError, match="not a PeftModel: pass the base model"):
        rm.movement(base, tokenizer, _rows(tokenizer))
    with pytest.raises(ValueError, match="an entropy gate"):
        rm.movement(base, tokenizer, _rows(tokenizer), base_model=base, mode="random")
    with pytest.raises(DataError, match="no rows"):
        rm.movement(base, tokenizer, [], base_model=base)
    with pytest.raises(DataError, match="row 0: the completion has no tokens"):
        rm.movement(base, tokenizer, [{"prompt_ids": [5, 6], "completion_ids": []}], base_model=base)


def test_the_example_script_runs_on_an_adapter_and_on_a_full_model(tiny_model_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tokenizer, base, peft = _models(tiny_model_dir)
    rows = _rows(tokenizer)
    tau = _median_tau(base, rows)
    peft.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(peft).merge_and_unload().save_pretrained(tmp_path / "merged")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parents[1] / "examples" / "measure_movement.py"
    outs = []
    for model in ("adapter", "merged"):
        out = subprocess.run([sys.executable, str(script), "--base", str(tiny_model_dir), "--model",
                              str(tmp_path / model), "--data", str(data), "--tau", repr(tau)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        outs.append(out.stdout)
    assert "5 rollouts" in outs[0] and "mean KL(base || model)" in outs[0]
    # The adapter (base pass with it disabled) and its merged copy (a separate base) moved alike.
    def kls(text):
        line = next(x for x in text.splitlines() if x.startswith("mean KL"))
        return [float(x) for x in line.split(":")[1].split("(")[0].replace("at forks,", "").replace("elsewhere", "").split()]

    assert kls(outs[0]) == pytest.approx(kls(outs[1]), abs=2e-4) and kls(outs[0])[0] > 0

"""eval.py end to end on the tiny model, and the accuracy statistics."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from reasonmaxxer.cli import eval_main
from reasonmaxxer.evaluation.accuracy import accuracy_summary, paired_bootstrap_delta, pass_at_k
from reasonmaxxer.testing import build_tiny_model_dir, tiny_run_args


def _eval_args(model_dir, run_dir, *extra):
    """The tiny run's settings, pointing eval at the run (--output_dir is where eval writes)."""
    args = tiny_run_args(model_dir, run_dir)
    i = args.index("--output_dir")
    args[i] = "--run_dir"
    return [*args, *EVAL_ARGS, *extra]


EVAL_ARGS = ("--eval.num_samples", "2", "--eval.movement_rollouts", "6", "--eval.bootstrap", "200",
             "--eval.top_positions", "5")


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 3, 2), (6, 1, 6), (6, 6, 3), (8, 2, 3)])
def test_pass_at_k_equals_brute_force_over_subsets(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_accuracy_summary_vs_hand_computation():
    rows = [{"problem_id": "a", "reward": r, "kind": "add", "completion_ids": [1] * 3} for r in (1, 0, 0, 1)]
    rows += [{"problem_id": "b", "reward": r, "kind": "mul", "completion_ids": [1] * 5} for r in (0, 0, 0, 0)]
    greedy = [{"problem_id": "a", "reward": 1.0}, {"problem_id": "b", "reward": 0.0}]
    out = accuracy_summary(rows, greedy, k=4)
    assert out["n"] == 2
    assert out["pass_at_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["pass_at_4"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["greedy_accuracy"] == pytest.approx(0.5)
    assert out["pass_at_1_by_kind"] == {"add": 0.5, "mul": 0.0}
    assert out["mean_completion_tokens"] == pytest.approx(4.0)


def test_pass_at_k_with_fewer_than_k_samples_is_not_reported_as_pass_at_k():
    # problem a: 4 samples (2 correct); problem b: only 2 samples (1 correct); k = 4
    rows = [{"problem_id": "a", "reward": r, "completion_ids": [1]} for r in (1, 0, 1, 0)]
    rows += [{"problem_id": "b", "reward": r, "completion_ids": [1]} for r in (0, 1)]
    out = accuracy_summary(rows, None, k=4)
    assert out["pass_at_4"] is None  # b cannot give a pass@4
    assert out["min_samples_per_problem"] == 2
    # pass@2 by brute force over pairs: a: 1 - C(2,2)/C(4,2) = 5/6; b: 1
    assert out["pass_at_2"] == pytest.approx((5 / 6 + 1.0) / 2)
    full = accuracy_summary(rows[:4], None, k=4)
    assert full["pass_at_4"] == pytest.approx(1.0) and "pass_at_2" not in full


def test_pass_at_1_by_kind_averages_per_problem_then_over_problems():
    # kind add: problem a 1/4 correct, problem c 1/1 correct -> (0.25 + 1) / 2, not 2/5 pooled
    rows = [{"problem_id": "a", "reward": r, "kind": "add", "completion_ids": [1]} for r in (1, 0, 0, 0)]
    rows += [{"problem_id": "c", "reward": 1, "kind": "add", "completion_ids": [1]}]
    rows += [{"problem_id": "b", "reward": r, "kind": "mul", "completion_ids": [1]} for r in (1, 0, 0)]
    out = accuracy_summary(rows, None, k=1)
    assert out["pass_at_1_by_kind"] == {"add": pytest.approx(0.625), "mul": pytest.approx(1 / 3)}
    assert out["pass_at_1"] == pytest.approx((0.25 + 1.0 + 1 / 3) / 3)


def test_partial_credit_is_not_a_correct_sample():
    # A reward function may give partial credit; pass@k counts only reward 1 as correct.
    rows = [{"problem_id": "a", "reward": r, "completion_ids": [1]} for r in (0.5, 0.5, 0.5, 1.0)]
    out = accuracy_summary(rows, None, k=2)
    assert out["pass_at_1"] == pytest.approx(pass_at_k(4, 1, 1))
    assert out["pass_at_2"] == pytest.approx(pass_at_k(4, 1, 2))


def test_paired_bootstrap_against_a_loop():
    rng = random.Random(0)
    base = {str(i): [float(rng.random() < 0.3) for _ in range(8)] for i in range(30)}
    adapter = {str(i): [float(rng.random() < 0.5) for _ in range(8)] for i in range(30)}
    out = paired_bootstrap_delta(base, adapter, resamples=4000, seed=1)
    diffs = [np.mean(adapter[i]) - np.mean(base[i]) for i in sorted(base)]
    assert out["mean"] == pytest.approx(float(np.mean(diffs)))
    lo, hi = out["ci95"]
    assert lo < out["mean"] < hi
    # Independent bootstrap with Python's RNG: the interval agrees to Monte Carlo error.
    r = random.Random(5)
    boots = sorted(np.mean([diffs[r.randrange(len(diffs))] for _ in diffs]) for _ in range(4000))
    assert lo == pytest.approx(boots[100], abs=0.02) and hi == pytest.approx(boots[3899], abs=0.02)
    assert paired_bootstrap_delta(base, adapter, resamples=500, seed=3) == \
        paired_bootstrap_delta(base, adapter, resamples=500, seed=3)


def test_identical_models_give_zero_delta_and_zero_width():
    base = {"a": [1.0, 0.0], "b": [0.0, 0.0]}
    out = paired_bootstrap_delta(base, base, resamples=200, seed=0)
    assert out["mean"] == 0.0 and out["ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------- eval.py


@pytest.mark.slow
def test_eval_writes_every_output(trained_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_main(_eval_args(tiny_model_dir, trained_run, "--output_dir", str(out)))
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "kl_ratio" in printed and "pass@1 base" in printed
    movement = json.loads((out / "movement.json").read_text())
    for key in ("gate", "positions", "fork", "nonfork", "kl_ratio", "kl_share_at_forks", "fork_share_of_positions",
                "high_entropy_overlap", "entropy_deciles"):
        assert key in movement, key
    assert movement["gate"]["mode"] == "threshold" and movement["gate"]["tau"] == 1.4
    metric_keys = {"kl_mean", "js_mean", "top1_agreement", "unshifted", "reranked", "shifted",
                   "promoted_in_base_top5", "dlogp_correct", "dlogp_wrong"}
    for where in ("fork", "nonfork"):
        if movement["positions"][where]:
            assert metric_keys <= set(movement[where])
            shares = movement[where]["unshifted"] + movement[where]["reranked"] + movement[where]["shifted"]
            assert shares == pytest.approx(1.0)
    base_samples = [json.loads(x) for x in (out / "eval_samples" / "base_samples.jsonl").read_text().splitlines()]
    assert len(base_samples) == 4 * 2  # 4 held-out problems x 2 samples
    picked = 6
    total = sum(len(r["completion_ids"]) for r in base_samples[:picked]) if all(
        r["reward"] == 0 for r in base_samples) else None
    if total is not None:  # the tiny model solves nothing: the first six rollouts are the ones measured
        assert movement["positions"]["fork"] + movement["positions"]["nonfork"] == total
    accuracy = json.loads((out / "accuracy.json").read_text())
    for who in ("base", "adapter"):
        assert {"pass_at_1", "pass_at_2", "greedy_accuracy", "n"} <= set(accuracy[who])
        assert accuracy[who]["n"] == 4
    assert set(accuracy["delta_pass_at_1"]) >= {"mean", "ci95"}
    # The run's own adapter was evaluated: its model card now carries the results.
    card = (trained_run / "adapter" / "README.md").read_text()
    base_p1, adapter_p1 = accuracy["base"]["pass_at_1"], accuracy["adapter"]["pass_at_1"]
    assert f"| pass@1 | {base_p1:.4g} | {adapter_p1:.4g} |" in card and "Not evaluated yet" not in card
    for name in ("report.md", "entropy_hist.png", "movement_by_entropy.png", "shift_classes.png", "forks.html"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "forks.html").read_text()
    assert 'class="tok' in page and "p_policy=" in page and "Correct rollouts" in page
    assert "Δpass@1" in (out / "report.md").read_text()


@pytest.mark.slow
def test_untrained_adapter_moves_nothing(tiny_model_dir, tmp_path, trained_run):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "fresh")  # LoRA B = 0: the policy is the base
    out = tmp_path / "eval"
    code = eval_main(_eval_args(tiny_model_dir, trained_run, "--adapter", str(tmp_path / "fresh"),
                                "--output_dir", str(out), "--gate.mode", "quantile", "--gate.quantile", "0.3"))
    assert code == 0
    movement = json.loads((out / "movement.json").read_text())
    for where in ("fork", "nonfork"):
        m = movement[where]
        assert m["kl_mean"] < 1e-6 and m["js_mean"] < 1e-6
        assert m["top1_agreement"] == 1.0 and m["unshifted"] == 1.0 and m["promoted_in_base_top5"] == 1.0
    assert movement["high_entropy_overlap"] == 1.0
    accuracy = json.loads((out / "accuracy.json").read_text())
    # Same weights, same seeds: identical samples.
    assert accuracy["base"]["pass_at_1"] == accuracy["adapter"]["pass_at_1"]
    base_rows = (out / "eval_samples" / "base_samples.jsonl").read_text().splitlines()
    adapter_rows = (out / "eval_samples" / "adapter_samples.jsonl").read_text().splitlines()
    assert [json.loads(r)["completion_ids"] for r in base_rows] == \
           [json.loads(r)["completion_ids"] for r in adapter_rows]


@pytest.mark.slow
def test_bad_adapters_are_one_line_errors(tiny_model_dir, tmp_path, trained_run, capsys):
    code = eval_main(_eval_args(tiny_model_dir, trained_run, "--adapter", str(tmp_path / "nope")))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a PEFT adapter folder" in err

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = build_tiny_model_dir(tmp_path / "other", hidden_size=32)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / "mismatch")
    code = eval_main(_eval_args(tiny_model_dir, trained_run, "--adapter", str(tmp_path / "mismatch")))
    err = capsys.readouterr().err.splitlines()[-1]  # (building the other model printed progress bars)
    assert code == 2 and err.startswith("error: --adapter:") and "does not match the base" in err
    assert "size mismatch" in err


@pytest.mark.slow
def test_eval_logs_tables_and_histograms_to_wandb(trained_run, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "eval"
    assert eval_main(_eval_args(tiny_model_dir, trained_run, "--output_dir", str(out),
                                "--tracking.report_to", "wandb")) == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records keep keys verbatim
    for key in ("eval/most_moved", "eval/base_entropy", "eval/kl_fork", "movement/kl_share_at_forks",
                "accuracy/delta_pass_at_1", "movement/fork/top1_agreement"):
        assert key.encode() in record, key


def test_controls_are_measured_at_their_reference_entropy_gate():
    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.evaluation.runner import movement_gate

    for mode in ("random", "all"):
        gate = load_config(None, ["--gate.mode", mode, "--gate.reference", "topk", "--gate.k", "3"]).gate
        measured = movement_gate(gate)
        assert measured.mode == "topk" and measured.k == 3
    gate = load_config(None, ["--gate.mode", "quantile"]).gate
    assert movement_gate(gate) == gate


# ----------------------------------------------------------------------------- prompts and rewards


EVAL_REWARD_MODULE = """
def longer_than_four(completions, completion_ids, **kwargs):
    return [float(len(ids) > 4) for ids in completion_ids]
"""


def test_eval_samples_with_the_training_prompts_and_reward(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A base model (no chat template): eval prompts are the plain ones rollouts use, rewards the user's."""
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.data.builtin import builtin_arithmetic
    from reasonmaxxer.evaluation.runner import sample_both
    from reasonmaxxer.stages.sampling import prompt_ids

    (tmp_path / "eval_rewards.py").write_text(EVAL_REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    tokenizer.chat_template = None
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    cfg = load_config(None, ["--output_dir", str(tmp_path / "run"), "--rollout.max_new_tokens", "8",
                             "--eval.num_samples", "2", "--reward.function", "eval_rewards:longer_than_four",
                             "--data.system_prompt", "Solve it.", "--training.use_cpu", "true"])
    problems = builtin_arithmetic(3, seed=0, split="heldout")
    with caplog.at_level(logging.INFO, logger="reasonmaxxer.stages.sampling"):
        got = sample_both(model, tokenizer, problems, cfg, tmp_path / "eval", False,
                          adapter_path=tmp_path / "adapter", base_path=str(tiny_model_dir))
    assert [r.getMessage() for r in caplog.records] == [
        "prompts: plain format (auto: the tokenizer has no chat template)"]  # once for all four samplings
    by_id = {p.id: p for p in problems}
    for key in ("base_samples", "adapter_samples", "base_greedy", "adapter_greedy"):
        assert got[key], key
        for r in got[key]:
            assert r["prompt_ids"] == prompt_ids(tokenizer, by_id[r["problem_id"]], cfg.data, "plain")
            assert tokenizer.decode(r["prompt_ids"]).startswith("Solve it.\n\nWhat")
            assert r["reward"] == float(len(r["completion_ids"]) > 4)

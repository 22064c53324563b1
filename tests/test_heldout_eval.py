"""Held-out pass@1 during training (reasonmaxxer.training.heldout_eval)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import wandb_runs_containing
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import TrainerControl

import reasonmaxxer.stages.rollouts as rollouts_module
import reasonmaxxer.training.heldout_eval as heldout_eval
from reasonmaxxer.cli import train_main
from reasonmaxxer.config import DataConfig, RolloutConfig
from reasonmaxxer.config.loading import config_from_dict
from reasonmaxxer.data.problem import Problem, read_split
from reasonmaxxer.testing import tiny_run_args
from reasonmaxxer.training.heldout_eval import HeldoutEval, pass_at_1, sample_heldout, step_seed


def _hash_verify(text: str, answer: str, answer_format: str = "any") -> tuple[float, None]:
    """A random tiny model solves nothing: reward by a hash of the text so pass@1 is in (0, 1)."""
    return float(zlib.crc32(text.encode()) % 2), None


def test_pass_at_1_is_the_mean_over_problems_of_the_fraction_correct():
    assert pass_at_1([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]) == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert pass_at_1([[1.0]]) == 1.0
    with pytest.raises(ValueError):
        pass_at_1([])


@pytest.fixture()
def stubbed(tiny_model_dir, monkeypatch):
    """The tiny model and tokenizer, with sampling and verifying replaced by known functions.

    Sample j of every prompt is the text of j+1 digits "j"; it is correct when j < the
    problem's answer. Each call records what the sampler saw.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []

    def fake_generate(model_, tokenizer_, prompts, cfg, eos_ids, *, seed, do_sample=True):
        calls.append({"prompts": len(prompts), "seed": seed, "samples": cfg.num_samples, "backend": cfg.backend,
                      "training": model_.training})
        torch.rand(1)  # a sampler that draws from the global RNG
        return [[(tokenizer_(str(j) * (j + 1), add_special_tokens=False)["input_ids"], "eos")
                 for j in range(cfg.num_samples)] for _ in prompts]

    monkeypatch.setattr(heldout_eval, "generate_batch", fake_generate)
    monkeypatch.setattr(rollouts_module, "verify",
                        lambda text, answer, answer_format="any": (float(int(text[0]) < int(answer)), text))
    return model, tokenizer, calls


def test_callback_logs_pass_at_1_of_a_hand_computation(stubbed):
    model, tokenizer, calls = stubbed
    answers = [0, 1, 1, 3, 4]
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {a - i}?", answer=str(a)) for i, a in enumerate(answers)]
    n = 4
    rollout = RolloutConfig(batch_size=8, backend="hf")  # 2 problems a batch; evaluation samples with fast anyway
    logged = []
    trainer = SimpleNamespace(model=model, processing_class=tokenizer,
                              log=lambda metrics: logged.append((dict(metrics), model.training)))
    callback = HeldoutEval(trainer, problems, DataConfig(), rollout, every_steps=3, num_samples=n, seed=5)
    model.train()
    rng_before = torch.get_rng_state()
    control = TrainerControl(should_log=True)
    state = SimpleNamespace(global_step=0, max_steps=7)
    for step in range(8):
        state.global_step = step
        (callback.on_train_begin if step == 0 else callback.on_step_end)(None, state, control)
        assert control.should_log  # the step's own train log entry is still written
    assert model.training  # train mode restored

    fractions = [min(a, n) / n for a in answers]  # samples 0..a-1 are correct
    tokens = [len(tokenizer(str(j) * (j + 1), add_special_tokens=False)["input_ids"]) for j in range(n)]
    assert [m["eval_pass_at_1"] for m, _ in logged] == pytest.approx([sum(fractions) / len(answers)] * 4)
    assert [m["eval_mean_completion_tokens"] for m, _ in logged] == pytest.approx([sum(tokens) / n] * 4)
    assert all(m["eval_seconds"] >= 0 for m, _ in logged)
    assert not any(training for _, training in logged)  # logged in eval mode: SFTTrainer's train metrics untouched
    # Steps 0, 3, 6 and the last (7); three batches each, sampled in eval mode with fast.
    assert len(calls) == 4 * 3 and sum(c["prompts"] for c in calls[:3]) == len(problems)
    assert all(c["samples"] == n and c["backend"] == "fast" and not c["training"] for c in calls)
    seeds = [[c["seed"] for c in calls[i : i + 3]] for i in range(0, 12, 3)]
    assert len({s for batch in seeds for s in batch}) == 12  # a seed per step and batch
    again = callback.measure(6)  # a resumed run redraws the same samples at the same step
    assert [c["seed"] for c in calls[-3:]] == seeds[2] and again["eval_pass_at_1"] == logged[2][0]["eval_pass_at_1"]
    # Evaluation leaves the global RNG where it was (training draws from it next).
    assert torch.equal(torch.get_rng_state(), rng_before)


def _train_log(run):
    return json.loads((run / "train_log.json").read_text())


@pytest.mark.slow
def test_training_logs_heldout_pass_at_1_without_changing_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rollouts_module, "verify", _hash_verify)  # rollouts and held-out eval reward alike
    with_eval, plain = tmp_path / "with_eval", tmp_path / "plain"

    def args(run, *extra):
        return tiny_run_args(tiny_model_dir, run, "--training.max_steps", "5", "--eval.num_samples", "3", *extra)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train_main(args(with_eval, "--eval.every_steps", "2", "--tracking.report_to", "wandb")) == 0
    # W&B gets them in the eval section of the same run (the Trainer maps eval_x to eval/x).
    # The run that holds the training metrics, read once W&B has written it.
    training_runs = wandb_runs_containing(with_eval / "wandb", b"train/fork_fraction")
    assert len(training_runs) == 1, len(training_runs)
    for key in ("eval/pass_at_1", "eval/mean_completion_tokens", "eval/seconds"):
        assert key.encode() in training_runs[0], key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = _train_log(with_eval)
    evals = {h["step"]: h for h in log if "eval_pass_at_1" in h}
    assert sorted(evals) == [0, 2, 4, 5]  # before training, every 2 steps, and the last step
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4, 5]  # every train log entry is still there
    for h in evals.values():
        assert 0 <= h["eval_pass_at_1"] <= 1 and 0 < h["eval_mean_completion_tokens"] <= 12 and h["eval_seconds"] > 0

    # The eval settings are not part of the training fingerprint: a rerun with others skips training.
    capsys.readouterr()
    assert train_main(args(with_eval, "--eval.every_steps", "3")) == 0
    assert any(line.startswith("training") and "skipped" in line for line in capsys.readouterr().out.splitlines())

    # The same run without evaluation (its upstream stages copied) trains to the same adapter.
    shutil.copytree(with_eval, plain, ignore=shutil.ignore_patterns("checkpoints", "adapter", "train_log.json"))
    (plain / "stages" / "training.json").unlink()
    assert train_main(args(plain)) == 0
    assert not any("eval_pass_at_1" in h for h in _train_log(plain))
    assert [h["loss"] for h in _train_log(plain) if "loss" in h] == [h["loss"] for h in log if "loss" in h]
    a = load_file(with_eval / "adapter" / "adapter_model.safetensors")
    b = load_file(plain / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Recompute the logged numbers at step 0 (the base) and step 5 (the saved adapter).
    from peft import PeftModel

    from reasonmaxxer.models.loading import load_model

    cfg = config_from_dict(yaml.safe_load((with_eval / "config.yaml").read_text()), check_training=False)
    problems = read_split(with_eval / "problems.jsonl", "heldout")[: cfg.eval.during_training_problems]
    sampling = dataclasses.replace(cfg.rollout, num_samples=3, backend="fast")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # In the dtype the run sampled with (model.dtype auto: bf16 on a CPU with native bf16).
    policy = PeftModel.from_pretrained(load_model(str(tiny_model_dir), dtype=cfg.model.dtype, device="cpu"),
                                       str(with_eval / "adapter")).eval()
    # During training accelerate runs the model's forward under the run's autocast (training.bf16), so
    # the recomputation does too.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.training["bf16"]))
    for step in (0, 5):
        if step == 0:
            with policy.disable_adapter(), autocast:
                found = sample_heldout(policy, tokenizer, problems, cfg.data, sampling, seed=step_seed(0, step))
        else:
            with autocast:
                found = sample_heldout(policy, tokenizer, problems, cfg.data, sampling, seed=step_seed(0, step))
        assert len(found) == len(problems) == 4
        expected = sum(sum(p["rewards"]) / len(p["rewards"]) for p in found.values()) / len(found)
        assert evals[step]["eval_pass_at_1"] == pytest.approx(expected), step


def test_sharded_weights_are_named(tmp_path, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert heldout_eval.sharded_weights({}) is None
    assert heldout_eval.sharded_weights({"fsdp": "full_shard"}) == "FSDP"
    zero3 = tmp_path / "ds.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert heldout_eval.sharded_weights({"deepspeed": str(zero3)}) == "DeepSpeed ZeRO-3"
    assert heldout_eval.sharded_weights({"deepspeed": {"zero_optimization": {"stage": 2}}}) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert heldout_eval.sharded_weights({}) is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert heldout_eval.sharded_weights({}) == "DeepSpeed ZeRO-3"


def test_evaluation_with_sharded_weights_stops_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    run = tmp_path / "run"
    assert train_main(tiny_run_args(tiny_model_dir, run, "--eval.every_steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: eval.every_steps: ") and "FSDP" in err
    assert not (run / "problems.jsonl").exists()

"""The online fork-gated trainer (method online): steps, the gradient's support, advantages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reasonmaxxer.config.loading import load_config
from reasonmaxxer.data.builtin import builtin_arithmetic
from reasonmaxxer.models.loading import load_model, load_tokenizer
from reasonmaxxer.stages.rollouts import RolloutReward
from reasonmaxxer.training.grpo import build_grpo_trainer
from reasonmaxxer.training.online import ForkGatedGRPOTrainer


def odd_token_reward(prompts, completions, completion_ids, **kwargs):
    """Mixed rewards from a random model: 1 for a completion whose first token id is odd."""
    return [float(c[0] % 2) if c else 0.0 for c in completion_ids]


def _online_trainer(model_dir: Path, tmp_path: Path, *overrides: str, dtype: str = "float32"):
    cfg = load_config(None, [
        "--method", "online", "--model.name_or_path", str(model_dir), "--output_dir", str(tmp_path),
        "--rollout.num_samples", "4", "--rollout.max_new_tokens", "8", "--rollout.temperature", "1.0",
        "--training.per_device_train_batch_size", "4", "--training.max_steps", "2",
        "--training.save_steps", "100", "--training.learning_rate", "0.05", "--lora.dropout", "0.0",
        "--grpo.gradient_checkpointing", "false", *overrides,
    ])
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=dtype, device="cpu")
    problems = builtin_arithmetic(4, seed=0, kinds=("add",))
    reward = RolloutReward(function=odd_token_reward, spec="odd_token_reward")
    return build_grpo_trainer(cfg, model, tokenizer, problems, tmp_path, progress=False, reward=reward), cfg


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("gate", [
    ["--gate.mode", "threshold", "--gate.tau", "5.0"],
    ["--gate.mode", "quantile", "--gate.quantile", "0.3"],
    ["--gate.mode", "random", "--gate.reference", "quantile"],
    ["--gate.mode", "all", "--gate.entropy_source", "policy"],
], ids=["threshold", "quantile", "random", "all"])
def test_two_online_steps_train_the_adapter(tiny_model_dir, tmp_path, gate):
    trainer, _ = _online_trainer(tiny_model_dir, tmp_path, *gate)
    assert isinstance(trainer, ForkGatedGRPOTrainer)
    before = _lora(trainer)
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _lora(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no LoRA weight moved"
    logged = [h for h in trainer.state.log_history if "fork_fraction" in h]
    assert logged and all(0 < h["fork_fraction"] <= 1 for h in logged)
    assert all(k in logged[-1] for k in ("fork_term", "kl_term", "base_entropy_forks", "compute/flops"))


def _batch(tokenizer, problems_ids: list[list[int]], completions: list[list[int]], advantages: list[float]):
    """A GRPO batch laid out as TRL lays it out: prompts left-padded, completions right-padded."""
    P, C = max(map(len, problems_ids)), max(map(len, completions))
    pad = tokenizer.pad_token_id
    out = {k: torch.full((len(completions), n), fill, dtype=torch.long)
           for k, n, fill in (("prompt_ids", P, pad), ("prompt_mask", P, 0), ("completion_ids", C, pad),
                              ("completion_mask", C, 0))}
    for i, (p, c) in enumerate(zip(problems_ids, completions)):
        out["prompt_ids"][i, P - len(p):] = torch.tensor(p)
        out["prompt_mask"][i, P - len(p):] = 1
        out["completion_ids"][i, : len(c)] = torch.tensor(c)
        out["completion_mask"][i, : len(c)] = 1
    out["advantages"] = torch.tensor(advantages)
    return out


def test_without_kl_the_gradient_comes_from_the_forks_only(tiny_model_dir, tmp_path):
    """kl_coef 0: the LoRA gradient equals that of sum_{forks} A * NLL / |F|, forks from the base entropy."""
    trainer, _ = _online_trainer(tiny_model_dir, tmp_path, "--loss.kl_coef", "0", "--loss.neg_prob_floor", "0")
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 300
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 5, 4)]
    completions = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (6, 2, 5)]
    inputs = _batch(trainer.processing_class, prompts, completions, [1.0, -0.5, 0.8])
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    # Independent: one plain forward per row, no padding; forks where the base entropy > tau.
    rows = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with model.disable_adapter(), torch.no_grad():
            base_logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        policy_logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        logp = policy_logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        rows.append((torch.distributions.Categorical(logits=base_logits).entropy(), logp))
    tau = torch.cat([h for h, _ in rows]).median().item()  # about half the positions are forks
    trainer.gate.tau = tau
    total = sum((inputs["advantages"][b] * -logp[h > tau]).sum() for b, (h, logp) in enumerate(rows))
    forks = sum(int((h > tau).sum()) for h, _ in rows)
    assert 0 < forks < sum(map(len, completions)), "the test needs forks and non-forks"
    got = torch.autograd.grad(trainer.compute_loss(model, inputs), lora)
    want = torch.autograd.grad(total / forks, lora)
    assert any(w.abs().sum() > 0 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_averages_micro_batches(tiny_model_dir, tmp_path, monkeypatch):
    """Two identical micro-batches accumulated give one micro-batch's gradient: the Trainer
    divides the per-micro-batch mean by the accumulation steps (TRL's own GRPO loss is
    scaled already; ours is not, on every supported transformers and TRL)."""
    trainer, _ = _online_trainer(tiny_model_dir, tmp_path)
    model = trainer.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 5, 4, 4)]
    completions = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (6, 2, 5, 3)]
    batch = _batch(trainer.processing_class, prompts, completions, [1.0, -0.5, 0.8, -1.3])
    monkeypatch.setattr(trainer, "_prepare_inputs", lambda inputs: inputs)  # the batch as given, no sampling
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def grads_after(steps: int) -> list[torch.Tensor]:
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = steps
        for _ in range(steps):
            trainer.training_step(model, dict(batch), num_items_in_batch=batch["completion_mask"].sum() * steps)
        return [p.grad.clone() for p in lora]

    one, two = grads_after(1), grads_after(2)
    assert any(a.abs().sum() > 0 for a in one)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_bf16_model_trains(tiny_model_dir, tmp_path):
    """The demo's default on a bf16 CPU, through trainer.train() (accelerate's bf16 wrapping): it once
    failed in the base pass with "expected m1 and m2 to have the same dtype, but got: float != BFloat16"."""
    trainer, _ = _online_trainer(tiny_model_dir, tmp_path, "--model.dtype", "bfloat16", "--training.bf16", "true",
                                 dtype="bfloat16")
    assert trainer.model.get_output_embeddings().weight.dtype == torch.bfloat16
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_group_advantages_are_per_prompt_group():
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0], [1.0], [1.0], [1.0]])
    fake = SimpleNamespace(num_generations=4, advantage_clip=2.5)
    got = ForkGatedGRPOTrainer.group_advantages(fake, rewards)
    first = torch.tensor([1.0, 0.0, 0.0, 0.0])
    want = (first - first.mean()) / first.std(unbiased=False)
    torch.testing.assert_close(got[:4], want.clamp(-2.5, 2.5))
    assert torch.equal(got[4:], torch.zeros(4))  # all equal: nothing to contrast


def test_compute_counts_continue_across_a_resumed_run(tiny_model_dir, tmp_path, monkeypatch):
    """Killed after checkpoint 2 and resumed: compute.json = checkpoint 2's totals + what step 3 trained,
    and the checkpoint entries of both runs are kept in order."""
    import json

    trained: list[tuple[int, int]] = []  # (step being trained, non-padding positions) per micro-batch
    compute_loss = ForkGatedGRPOTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        trained.append((self.state.global_step + 1, int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ForkGatedGRPOTrainer, "compute_loss", counting)
    steps = ["--training.max_steps", "3", "--training.save_steps", "1"]
    first, _ = _online_trainer(tiny_model_dir, tmp_path, *steps)
    first.train()
    at_2 = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "compute.json").read_text())
    assert at_2["total"]["trained_tokens"] == sum(n for s, n in trained if s <= 2)
    assert [c["step"] for c in at_2["checkpoints"]] == [1, 2]

    trained.clear()
    second, _ = _online_trainer(tiny_model_dir, tmp_path, *steps)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-2"))
    assert {s for s, _ in trained} == {3}  # only the step after the checkpoint ran again
    totals = second.write_compute()
    assert totals.trained_tokens == at_2["total"]["trained_tokens"] + sum(n for _, n in trained)
    assert totals.forward_tokens > at_2["total"]["forward_tokens"]
    assert totals.wall_seconds > at_2["total"]["wall_seconds"]
    record = json.loads((tmp_path / "compute.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [1, 2, 3]
    assert record["checkpoints"][:2] == at_2["checkpoints"]

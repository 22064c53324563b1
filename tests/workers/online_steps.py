"""Run by tests/test_distributed.py under torchrun: two online steps with the quantile gate.

Each process records, per micro-batch, the entropy and mask the gate read and the forks
it returned, and per generation the rewards gathered over all processes and its own
rows' advantages; it saves them to ``<out>/rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch

import reasonmaxxer.training.trainer as trainer_module
from reasonmaxxer.config.loading import load_config
from reasonmaxxer.data.builtin import builtin_arithmetic
from reasonmaxxer.models.loading import load_model, load_tokenizer
from reasonmaxxer.stages.rollouts import RolloutReward
from reasonmaxxer.training.grpo import build_grpo_trainer
from reasonmaxxer.training.online import ForkGatedGRPOTrainer


def odd_token_reward(prompts, completions, completion_ids, **kwargs):
    """Mixed rewards from a random model: 1 for a completion whose first token id is odd."""
    return [float(c[0] % 2) if c else 0.0 for c in completion_ids]


if __name__ == "__main__":
    model_dir, out, quantile = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    gate_calls, generations = [], []
    gate_mask = trainer_module.gate_mask

    def recording_gate_mask(gate, entropy, completion_mask, **kwargs):
        forks = gate_mask(gate, entropy, completion_mask, **kwargs)
        gate_calls.append({"entropy": entropy.detach().clone(), "mask": completion_mask.clone(), "forks": forks})
        return forks

    trainer_module.gate_mask = recording_gate_mask
    generate = ForkGatedGRPOTrainer._generate_and_score_completions

    def recording_generate(self, inputs):
        result = generate(self, inputs)
        generations.append({"rewards": self._rewards_gathered.clone(), "advantages": result["advantages"].clone()})
        return result

    ForkGatedGRPOTrainer._generate_and_score_completions = recording_generate
    cfg = load_config(None, [
        "--method", "online", "--model.name_or_path", str(model_dir), "--output_dir", str(out / "run"),
        "--rollout.num_samples", "4", "--rollout.max_new_tokens", "8", "--rollout.temperature", "1.0",
        "--training.per_device_train_batch_size", "4", "--training.max_steps", "2",
        "--training.save_steps", "100", "--training.learning_rate", "0.05", "--lora.dropout", "0.0",
        "--grpo.gradient_checkpointing", "false", "--gate.mode", "quantile", "--gate.quantile", quantile,
    ])
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32", device="cpu")
    problems = builtin_arithmetic(8, seed=0, kinds=("add",))
    reward = RolloutReward(function=odd_token_reward, spec="odd_token_reward")
    trainer = build_grpo_trainer(cfg, model, tokenizer, problems, out / "run", progress=False, reward=reward)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"world": trainer.accelerator.num_processes, "steps": trainer.state.global_step,
                "num_generations": trainer.num_generations, "gate_calls": gate_calls, "generations": generations,
                "compute": trainer.compute_totals().to_dict()},
               out / f"rank{rank}.pt")
    trainer.accelerator.end_training()

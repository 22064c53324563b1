"""Swap TRL's GRPOTrainer for the fork-gated one: same script, gradient only at the base's forks.

    python examples/gated_grpo.py                 # the embedded SmolLM2, sums, 10 steps

The two lines that change from a TRL GRPO script are marked. The gate reads the *base*
model's entropy (the adapter disabled), which TRL's ``top_entropy_quantile`` (the
policy's entropy) cannot do; non-fork positions are anchored to the base by the exact KL.
"""

import argparse
import random

from datasets import Dataset
from peft import LoraConfig

import reasonmaxxer as rm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m-instruct", help="hub id, folder, or the embedded default")
parser.add_argument("--output_dir", default="fork-gated-grpo")
parser.add_argument("--max_steps", type=int, default=10)
cli = parser.parse_args()

rng = random.Random(0)
sums = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(64)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Give the number."}],
                              "answer": str(a + b)} for a, b in sums])


def correct(completions, answer, **kwargs):
    return [float(ans in c[0]["content"]) for c, ans in zip(completions, answer)]


args = rm.ForkGatedGRPOConfig(  # was: trl.GRPOConfig
    cli.output_dir, max_steps=cli.max_steps, learning_rate=1e-4, num_generations=4, per_device_train_batch_size=8,
    max_completion_length=48, temperature=0.7, gate_tau=2.2, kl_coef=0.2, entropy_temperature=0.7,
    report_to="none", logging_steps=1)
trainer = rm.ForkGatedGRPOTrainer(  # was: trl.GRPOTrainer
    model=rm.resolve_model_path(cli.model), reward_funcs=correct, args=args, train_dataset=dataset,
    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
trainer.train()
trainer.save_model(cli.output_dir)
trainer.accelerator.end_training()  # leaves the process group under torchrun / accelerate launch
last = trainer.state.log_history[-2]
print(f"adapter in {cli.output_dir}: {trainer.state.global_step} steps, last reward {last.get('reward')}, "
      f"fork fraction {last.get('fork_fraction')}")

"""Run by tests/test_distributed.py under torchrun: the public trainer given the model by name, so it
loads it (through TRL) after the process group exists, then scores the base and trains 2 steps.

    public_trainer_by_name.py MODEL_DIR ROWS.jsonl OUTPUT_DIR
"""

import sys

import peft
from datasets import load_dataset

import reasonmaxxer as rm

model_dir, data, out = sys.argv[1:4]
args = rm.ForkGatedConfig(out, gate_tau=4.0, kl_coef=0.2, learning_rate=1e-4, max_steps=2, per_device_train_batch_size=8,
                          report_to="none")
trainer = rm.ForkGatedTrainer(model_dir, args, train_dataset=load_dataset("json", data_files=data, split="train"),
                              peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
trainer.train()
trainer.save_model(out)
trainer.accelerator.end_training()
print(f"{len(trainer.train_dataset)} rollouts, {trainer.state.global_step} steps")

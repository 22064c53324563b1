"""Train a fork-gated LoRA adapter on your own rollouts.

    python examples/train_on_rollouts.py                                  # samples its own rollouts
    python examples/train_on_rollouts.py --data runs/demo/rollouts.jsonl  # or reads yours

``--data`` is a JSONL file of TRL-style rows, several completions per prompt: ``prompt``
and ``completion`` (text, or lists of chat messages) or ``prompt_ids`` and
``completion_ids``, with a ``reward`` (or an ``advantage``). Without it, the script
samples 8 answers to each of 24 sums from the base and rewards the right ones.
"""

import argparse
import random

from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import reasonmaxxer as rm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m-instruct", help="hub id, folder, or the embedded default")
parser.add_argument("--data", help="JSONL rollouts (default: sample them from the base)")
parser.add_argument("--output_dir", default="fork-gated-adapter")
parser.add_argument("--tau", type=float, default=2.2, help="fork threshold on the base entropy, nats")
parser.add_argument("--max_steps", type=int, default=30)
cli = parser.parse_args()
path = rm.resolve_model_path(cli.model)
tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)

if cli.data:
    dataset = load_dataset("json", data_files=cli.data, split="train")
else:  # your rollouts: 8 samples per prompt from the base, rewarded by a check of the answer
    rows, rng = [], random.Random(0)
    for a, b in [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(24)]:
        prompt = [{"role": "user", "content": f"What is {a} + {b}? Think briefly, then give the number."}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, do_sample=True, temperature=0.7, max_new_tokens=48, num_return_sequences=8)
        for text in tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True):
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}],
                         "reward": float(str(a + b) in text)})
    dataset = Dataset.from_list(rows)

args = rm.ForkGatedConfig(cli.output_dir, gate_tau=cli.tau, kl_coef=0.2, learning_rate=1e-4, max_steps=cli.max_steps,
                          per_device_train_batch_size=8, report_to="none")
lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = rm.ForkGatedTrainer(model, args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
trainer.train()
trainer.save_model(cli.output_dir)
trainer.accelerator.end_training()  # leaves the process group under torchrun / accelerate launch
print(f"adapter in {cli.output_dir}: {len(trainer.train_dataset)} rollouts, {trainer.state.global_step} steps")

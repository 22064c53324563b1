"""Under torchrun: a NaN appears in process 1's adapter only; both processes must stop at that step."""

import sys

import datasets
import peft
import torch
from transformers import TrainerCallback

import reasonmaxxer as rm
from reasonmaxxer.errors import TrainingDivergedError
from reasonmaxxer.utils import distributed as dist

model_dir, out_dir = sys.argv[1], sys.argv[2]
dist.init(timeout_s=60)  # a process left waiting would fail after a minute, not hang the test for 30


class CorruptOnRank1(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and dist.rank() == 1:
            with torch.no_grad():  # under ZeRO-3 the parameter is a placeholder: its partition is ds_tensor
                weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
                getattr(weight, "ds_tensor", weight).fill_(float("nan"))


rows = [{"prompt_ids": [5, 6, 7 + i], "completion_ids": [8 + j, 9, 10 + i], "reward": float(j % 2)}
        for i in range(4) for j in range(4)]
args = rm.ForkGatedConfig(out_dir, use_cpu=True, bf16=sys.argv[3] == "bf16", report_to="none", anchor_top_k=8, max_steps=3,
                          per_device_train_batch_size=4, gate_mode="quantile", gate_quantile=0.3, save_steps=100)
trainer = rm.ForkGatedTrainer(model_dir, args, train_dataset=datasets.Dataset.from_list(rows),
                              peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
trainer.callback_handler.callbacks.insert(0, CorruptOnRank1())  # before FiniteAdapterCheck
scores = trainer.data_collator.scores
entropy = sum(float(scores[i]["entropy"].double().sum()) for i in range(len(rows)))
print(f"rank {dist.rank()} base entropy sum {entropy:.6f}", flush=True)
try:
    trainer.train()
except TrainingDivergedError as err:
    print(f"rank {dist.rank()} stopped at step {trainer.state.global_step}: {str(err)[:60]}", flush=True)
    sys.exit(4)
print(f"rank {dist.rank()} finished {trainer.state.global_step} steps", flush=True)
dist.close()

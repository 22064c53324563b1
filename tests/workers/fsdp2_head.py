"""Under torchrun: the policy statistics of a PEFT model sharded by torch's FSDP2 equal the unsharded ones.

accelerate does not enable FSDP on CPU processes, so this shards with torch's own fully_shard (what
accelerate calls on GPUs): each decoder layer, then the root. The LM head is then a sharded DTensor,
which the fused head does not take (linear_head is None): the statistics run through the module.
"""

import sys

import peft
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from reasonmaxxer.models.forward import linear_head, policy_token_stats
from reasonmaxxer.utils.sequences import pack_batch

model_dir = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()


def lora_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


batch = pack_batch([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], 2)
whole = lora_model()
want = policy_token_stats(whole, whole, batch, kl_anchor="exact")
sharded = lora_model()
for layer in sharded.get_base_model().model.layers:
    fully_shard(layer)
fully_shard(sharded)
head = linear_head(sharded.get_base_model())
got = policy_token_stats(sharded, sharded, batch, kl_anchor="exact")
got.logp.sum().backward()
mask = batch["completion_mask"].bool()
print(f"rank {rank}: fused head {'used' if head is not None else 'not used'}, "
      f"logp diff {float((got.logp - want.logp)[mask].abs().max()):.2e}, "
      f"kl diff {float((got.kl - want.kl)[mask].abs().max()):.2e}", flush=True)

# The adapter's NaN check on sharded weights: a NaN in process 1's shard stops both processes.
from transformers import TrainerState  # noqa: E402

from reasonmaxxer.errors import TrainingDivergedError  # noqa: E402
from reasonmaxxer.training.trainer import FiniteAdapterCheck  # noqa: E402

check, state = FiniteAdapterCheck(), TrainerState()
check.on_step_end(None, state, None, model=sharded)  # finite: passes
if rank == 1:
    with torch.no_grad():
        next(p for n, p in sharded.named_parameters() if "lora_B" in n).to_local().fill_(float("nan"))
try:
    check.on_step_end(None, state, None, model=sharded)
    print(f"rank {rank}: NaN not seen", flush=True)
except TrainingDivergedError:
    print(f"rank {rank}: NaN in a shard stops this process", flush=True)
dist.destroy_process_group()

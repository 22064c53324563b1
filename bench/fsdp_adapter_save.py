"""What saving the adapter costs under FSDP2: transformers' whole-model gather against the adapter alone.

    torchrun --nproc_per_node 2 bench/fsdp_adapter_save.py [--hidden 1024 --layers 16 --vocab 32000]

Builds a random Llama-shaped base in each process, puts LoRA (r 16, every linear layer) on
it, trains one step under accelerate's FSDP2 with ``FULL_STATE_DICT`` (on CPU processes it
lifts accelerate's GPU-only check first), then saves the adapter twice:

- ``transformers``: ``Trainer.save_model``, which gathers every weight, the frozen base
  included, onto process 0 before PEFT keeps the adapter's;
- ``reasonmaxxer``: ``FsdpAdapterSave.save_model``, which gathers the trainable tensors only
  (with ``SHARDED_STATE_DICT`` transformers saves no adapter at all, so this is the only one).

Prints, for each, the wall seconds and process 0's resident-memory peak above its level
before the save (sampled every 2 ms), the ratios, and whether the two adapters are equal.
"""

import argparse
import os
import tempfile
import threading
import time

FSDP_ENV = {  # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets, with a full state dict
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_USE_ORIG_PARAMS": "true",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}


ARMS = ("transformers", "reasonmaxxer")


class PeakRss:
    """Resident memory of this process above its level at entry, peak over the block (GiB)."""

    def __enter__(self):
        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.above = (self.peak - self.start) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--first", choices=ARMS, default=ARMS[0],
                    help="the arm that saves first (freed memory stays resident and the second may reuse it)")
    args = ap.parse_args()
    for key, value in FSDP_ENV.items():
        os.environ.setdefault(key, value)

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from reasonmaxxer.testing import allow_fsdp_on_cpu
    from reasonmaxxer.training.trainer import FsdpAdapterSave

    if not torch.cuda.is_available():
        allow_fsdp_on_cpu()

    class AdapterSavingTrainer(FsdpAdapterSave, Trainer):
        pass

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256,
                         vocab_size=args.vocab, max_position_embeddings=256)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=args.rank, target_modules="all-linear"))
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(3, args.vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    with tempfile.TemporaryDirectory() as scratch:
        # Every process needs the same folder: process 0 makes it and sends its name.
        folder = [scratch]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(folder, src=0)
        trainer = AdapterSavingTrainer(model, TrainingArguments(
            folder[0], max_steps=1, per_device_train_batch_size=1, report_to="none", save_strategy="no",
            disable_tqdm=True, bf16=True, use_cpu=not torch.cuda.is_available()), train_dataset=data)
        trainer.train()
        main = trainer.accelerator.is_main_process
        if main:
            print(f"model {total / 1e6:.1f}M parameters (adapter {adapter / 1e6:.2f}M), {trainer.accelerator.num_processes} "
                  f"processes, {trainer.accelerator.distributed_type.value}, {type(trainer.model_wrapped).__name__}, "
                  f"mixed precision {trainer.accelerator.mixed_precision}")
        figures = {}
        for arm in sorted(ARMS, key=lambda arm: arm != args.first):
            out = os.path.join(folder[0], arm)
            trainer.accelerator.wait_for_everyone()
            with PeakRss() as rss:
                start = time.perf_counter()
                if arm == "transformers":
                    super(FsdpAdapterSave, trainer).save_model(out)
                else:
                    trainer.save_model(out)
                trainer.accelerator.wait_for_everyone()
                seconds = time.perf_counter() - start
            figures[arm] = (seconds, rss.above)
            if main:
                print(f"{arm}: save {seconds:.3f} s, process 0 peak +{rss.above:.3f} GiB")
        if main:
            a, b = (load_file(os.path.join(folder[0], arm, "adapter_model.safetensors"))
                    for arm in ARMS)
            equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            (t_s, t_m), (r_s, r_m) = figures["transformers"], figures["reasonmaxxer"]
            print(f"adapters_equal={equal} time_ratio={t_s / r_s:.2f} (transformers / reasonmaxxer) "
                  f"peak_gib_transformers={t_m:.3f} peak_gib_reasonmaxxer={r_m:.3f}")
        trainer.accelerator.end_training()


if __name__ == "__main__":
    main()

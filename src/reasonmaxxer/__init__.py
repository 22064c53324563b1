"""ReasonMaxxer: entropy-gated fine-tuning of reasoning models at their decision forks."""

from .entropy import fork_mask, token_entropy, token_stats
from .errors import ConfigError, DataError, UserError
from .loss import exact_kl, fork_gated_loss, gather_logprobs, topk_kl

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "UserError",
    "exact_kl",
    "fork_gated_loss",
    "fork_mask",
    "gather_logprobs",
    "token_entropy",
    "token_stats",
    "topk_kl",
]

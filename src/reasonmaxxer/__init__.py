"""ReasonMaxxer: entropy-gated fine-tuning of reasoning models at their decision forks."""

from .core.entropy import token_entropy, token_stats
from .core.gate import fork_mask
from .core.kl import exact_kl, topk_kl
from .core.logprobs import gather_logprobs
from .core.loss import fork_gated_loss
from .errors import ConfigError, DataError, UserError

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

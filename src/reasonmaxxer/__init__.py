"""ReasonMaxxer: entropy-gated fine-tuning of reasoning models at their decision forks."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.entropy import token_entropy, token_stats
    from .core.gate import fork_mask
    from .core.kl import exact_kl, topk_kl
    from .core.logprobs import gather_logprobs
    from .core.loss import fork_gated_loss
    from .errors import ConfigError, DataError, UserError
    from .evaluation.measure import movement

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
}
__all__ = [
    "ConfigError",
    "DataError",
    "UserError",
    "exact_kl",
    "fork_gated_loss",
    "fork_mask",
    "gather_logprobs",
    "movement",
    "token_entropy",
    "token_stats",
    "topk_kl",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a torch-free submodule (the config) does not import torch.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: ``rm.core``, ``rm.jobs``
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

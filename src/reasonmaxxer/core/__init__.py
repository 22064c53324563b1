"""The method as pure tensor functions; this package imports nothing but torch.

- :mod:`.entropy`: per-token entropy and the statistics scoring stores;
- :mod:`.gate`: which completion positions are forks (:func:`fork_mask`);
- :mod:`.logprobs`: fused log-probs of chosen tokens (and the exact KL in the same pass);
- :mod:`.fused_head`: the same from hidden states through the LM head, never holding the logits;
- :mod:`.kl`: KL(base || policy), full and from the cached top-k;
- :mod:`.loss`: the fork-gated objective (:func:`fork_gated_loss`);
- :mod:`.advantages`: group-relative advantages;
- :mod:`.ops`: masked mean, quantiles, expectations;
- :mod:`.options`: the names of the gate modes and loss variants (torch-free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .advantages import group_advantages
    from .entropy import token_entropy, token_stats
    from .fused_head import fused_head_logprobs
    from .gate import fork_mask, gate_mask
    from .kl import exact_kl, topk_kl
    from .logprobs import gather_logprobs, policy_logprobs, policy_logprobs_and_kl
    from .loss import fork_gated_loss, stats_to_floats
    from .options import GATE_MODES, LOSS_VARIANTS, GateMode, LossVariant

_EXPORTS: dict[str, str] = {
    "group_advantages": ".advantages",
    "token_entropy": ".entropy",
    "token_stats": ".entropy",
    "fused_head_logprobs": ".fused_head",
    "fork_mask": ".gate",
    "gate_mask": ".gate",
    "GATE_MODES": ".options",
    "LOSS_VARIANTS": ".options",
    "GateMode": ".options",
    "LossVariant": ".options",
    "exact_kl": ".kl",
    "topk_kl": ".kl",
    "gather_logprobs": ".logprobs",
    "policy_logprobs": ".logprobs",
    "policy_logprobs_and_kl": ".logprobs",
    "fork_gated_loss": ".loss",
    "stats_to_floats": ".loss",
}
__all__ = [
    "GATE_MODES",
    "GateMode",
    "LOSS_VARIANTS",
    "LossVariant",
    "exact_kl",
    "fork_gated_loss",
    "fork_mask",
    "fused_head_logprobs",
    "gate_mask",
    "gather_logprobs",
    "group_advantages",
    "policy_logprobs",
    "policy_logprobs_and_kl",
    "stats_to_floats",
    "token_entropy",
    "token_stats",
    "topk_kl",
]


# Lazy, so that importing a torch-free submodule (the config) does not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

"""The method as pure tensor functions; this package imports nothing but torch.

- :mod:`.entropy`: per-token entropy and the statistics scoring stores;
- :mod:`.gate`: which completion positions are forks (:func:`fork_mask`);
- :mod:`.logprobs`: fused log-probs of chosen tokens (and the exact KL in the same pass);
- :mod:`.fused_head`: the same from hidden states through the LM head, never holding the logits;
- :mod:`.kl`: KL(base || policy), full and from the cached top-k;
- :mod:`.loss`: the fork-gated objective (:func:`fork_gated_loss`);
- :mod:`.advantages`: group-relative advantages;
- :mod:`.ops`: masked mean, quantiles, expectations.
"""

from .advantages import group_advantages
from .entropy import token_entropy, token_stats
from .fused_head import fused_head_logprobs
from .gate import GATE_MODES, GateMode, fork_mask, gate_mask
from .kl import exact_kl, topk_kl
from .logprobs import gather_logprobs, policy_logprobs, policy_logprobs_and_kl
from .loss import LOSS_VARIANTS, LossVariant, fork_gated_loss, stats_to_floats

__all__ = [
    "GATE_MODES", "LOSS_VARIANTS", "GateMode", "LossVariant", "exact_kl", "fork_gated_loss", "fork_mask",
    "fused_head_logprobs", "gate_mask", "gather_logprobs", "group_advantages", "policy_logprobs", "policy_logprobs_and_kl",
    "stats_to_floats", "token_entropy", "token_stats", "topk_kl",
]

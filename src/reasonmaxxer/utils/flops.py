"""Compute charged in model FLOPs estimated from token counts, the same way for every trainer.

The estimate is the usual dense-transformer one: a forward pass costs about ``2·N`` FLOPs
per token and a training step (forward and backward) about ``6·N``, with ``N`` the base
model's parameter count. LoRA's backward skips the base weights' gradients, so ``6·N``
overstates a LoRA step somewhat; every arm of a comparison is charged the same rule, which
is what makes their figures comparable. Attention's length-dependent term is left out (it is
small next to ``N`` at the lengths these runs use).

What counts as a forward token: every position a model processes without a gradient —
prompt and completion positions of rollouts (prefill included, once per sample),
scoring passes, and reference (adapter-disabled) passes. A trained token is every
position of a sequence that goes through a training step's forward and backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FORWARD_FLOPS_PER_PARAM = 2
TRAIN_FLOPS_PER_PARAM = 6


def base_parameter_count(model: Any) -> int:
    """N of the rule: the base model's parameters (a tied tensor once), LoRA's left out."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def model_flops(n_params: int, *, forward_tokens: int = 0, trained_tokens: int = 0) -> float:
    """``2·N·forward_tokens + 6·N·trained_tokens``."""
    if n_params < 0 or forward_tokens < 0 or trained_tokens < 0:
        raise ValueError(f"counts must be >= 0, got n_params={n_params}, forward_tokens={forward_tokens}, "
                         f"trained_tokens={trained_tokens}")
    return float(n_params) * (FORWARD_FLOPS_PER_PARAM * forward_tokens + TRAIN_FLOPS_PER_PARAM * trained_tokens)


@dataclasses.dataclass
class ComputeLedger:
    """Running totals of what a run has spent: token counts, their FLOPs and measured wall seconds."""

    n_params: int
    forward_tokens: int = 0
    trained_tokens: int = 0
    wall_seconds: float = 0.0

    def add(self, *, forward_tokens: int = 0, trained_tokens: int = 0, wall_seconds: float = 0.0) -> None:
        self.forward_tokens += int(forward_tokens)
        self.trained_tokens += int(trained_tokens)
        self.wall_seconds += float(wall_seconds)

    @property
    def flops(self) -> float:
        return model_flops(self.n_params, forward_tokens=self.forward_tokens, trained_tokens=self.trained_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops": self.flops}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComputeLedger:
        return cls(n_params=int(d["n_params"]), forward_tokens=int(d.get("forward_tokens", 0)),
                   trained_tokens=int(d.get("trained_tokens", 0)), wall_seconds=float(d.get("wall_seconds", 0.0)))

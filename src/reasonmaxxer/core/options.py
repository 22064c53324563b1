"""The names of the gate modes and loss variants, as types; no torch here.

The config schema validates against these, so ``reasonmaxxer.config`` (and ``train.py
--help``) loads without importing torch.
"""

from __future__ import annotations

import typing
from typing import Literal

GateMode = Literal["threshold", "quantile", "topk", "all", "random"]
"""``threshold``: H > tau; ``quantile``: top rho of the batch; ``topk``: k per sequence;
``all`` and ``random``: the dense and the matched random controls."""
GATE_MODES: tuple[str, ...] = typing.get_args(GateMode)

ReferenceMode = Literal["threshold", "quantile", "topk"]
"""The entropy gates: those a ``random`` control can match the per-sequence counts of."""
REFERENCE_MODES: tuple[str, ...] = typing.get_args(ReferenceMode)

LossVariant = Literal["signed", "positive_only", "hinge", "split", "correct_sft"]
"""``signed``: A * NLL at forks (the paper's ``adv_ce``); ``positive_only``: A-weighted
gated SFT on correct rollouts; ``hinge``: on log pi - log pi_base (the paper's
``delta_hinge``); ``split``: positive and negative forks normalised apart;
``correct_sft``: unweighted NLL at correct rollouts' forks, every other position anchored
(the paper's ``correct_sft``)."""
LOSS_VARIANTS: tuple[str, ...] = typing.get_args(LossVariant)

FlooredForks = Literal["anchor", "drop"]
"""What a floored wrong-rollout fork becomes: ``anchor`` (it leaves the fork set and is
KL-anchored; the paper's rule) or ``drop`` (it keeps its place in the fork count and
gets neither push nor anchor)."""
FLOORED_FORKS: tuple[str, ...] = typing.get_args(FlooredForks)

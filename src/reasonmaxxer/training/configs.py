"""``ForkGatedConfig`` and ``ForkGatedGRPOConfig``: TRL's configs with the gate and the loss as flat fields.

Each field's default and help text are the CLI's (``gate.*``, ``loss.*``, ``scoring.*``,
``selection.advantage_clip``), read from :mod:`reasonmaxxer.config.schema`, so the
library and the YAML configs cannot drift apart. Pinned to trl==1.16.* (``SFTConfig``,
``GRPOConfig``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from trl import GRPOConfig, SFTConfig

from ..config import GateConfig, LossConfig, ScoringConfig, SelectionConfig
from ..core.options import FlooredForks, GateMode, LossVariant, ReferenceMode
from ..errors import ConfigError


def _like(section: type, name: str) -> Any:
    """A field with the default and the help text of the CLI's ``section.name``."""
    source = next(f for f in dataclasses.fields(section) if f.name == name)
    return dataclasses.field(default=source.default, metadata={"help": source.metadata["help"]})


# (flat field, CLI key) of the options both trainers share; the offline one adds _OFFLINE_KEYS.
_GATE_KEYS = {"gate_mode": "mode", "gate_tau": "tau", "gate_tau_pos": "tau_pos", "gate_tau_neg": "tau_neg",
              "gate_quantile": "quantile", "gate_k": "k", "gate_reference": "reference",
              "gate_entropy_source": "entropy_source"}
_LOSS_KEYS = {"loss_variant": "variant", "kl_coef": "kl_coef", "neg_prob_floor": "neg_prob_floor",
              "floored_forks": "floored_forks", "hinge_margin": "hinge_margin",
              "hinge_margin_neg": "hinge_margin_neg", "max_nonfinite_in_a_row": "max_nonfinite_in_a_row"}
_OFFLINE_LOSS_KEYS = {"kl_anchor": "kl_anchor", "kl_on_prompt": "kl_on_prompt"}


def fork_gated_kwargs(gate: GateConfig, loss: LossConfig, *, online: bool = False) -> dict[str, Any]:
    """The CLI's ``gate`` and ``loss`` sections as the flat fields of ForkGatedConfig (or, ``online``,
    of ForkGatedGRPOConfig)."""
    loss_keys = _LOSS_KEYS if online else {**_LOSS_KEYS, **_OFFLINE_LOSS_KEYS}
    return {**{flat: getattr(gate, cli) for flat, cli in _GATE_KEYS.items()},
            **{flat: getattr(loss, cli) for flat, cli in loss_keys.items()}}


@dataclass
class _ForkGatedFields:
    """The gate, the loss and the entropy options shared by the offline and the online trainer."""

    gate_mode: GateMode = _like(GateConfig, "mode")
    gate_tau: float = _like(GateConfig, "tau")
    gate_tau_pos: float | None = _like(GateConfig, "tau_pos")
    gate_tau_neg: float | None = _like(GateConfig, "tau_neg")
    gate_quantile: float = _like(GateConfig, "quantile")
    gate_k: int = _like(GateConfig, "k")
    gate_reference: ReferenceMode = _like(GateConfig, "reference")
    gate_entropy_source: Literal["base", "policy"] = _like(GateConfig, "entropy_source")
    loss_variant: LossVariant = _like(LossConfig, "variant")
    kl_coef: float = _like(LossConfig, "kl_coef")
    neg_prob_floor: float = _like(LossConfig, "neg_prob_floor")
    floored_forks: FlooredForks = _like(LossConfig, "floored_forks")
    hinge_margin: float = _like(LossConfig, "hinge_margin")
    hinge_margin_neg: float | None = _like(LossConfig, "hinge_margin_neg")
    max_nonfinite_in_a_row: int = _like(LossConfig, "max_nonfinite_in_a_row")
    entropy_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "The temperature the gate's entropy is measured at (the sampling "
                                       "temperature of the rollouts is the natural choice)."})
    advantage_clip: float = _like(SelectionConfig, "advantage_clip")

    # The loss fields this config has (the online one has no kl_anchor: its KL is always exact).
    _loss_keys: ClassVar[dict[str, str]] = {**_LOSS_KEYS, **_OFFLINE_LOSS_KEYS}

    @property
    def gate_config(self) -> GateConfig:
        """The gate fields as the :class:`~reasonmaxxer.config.GateConfig` the trainers read."""
        return GateConfig(**{cli: getattr(self, flat) for flat, cli in _GATE_KEYS.items()})

    @property
    def loss_config(self) -> LossConfig:
        """The loss fields as the :class:`~reasonmaxxer.config.LossConfig` the trainers read."""
        loss = LossConfig(**{cli: getattr(self, flat) for flat, cli in self._loss_keys.items()})
        if "kl_anchor" not in self._loss_keys:
            loss.kl_anchor = "exact"
        return loss

    def _default_precision(self) -> None:
        """``bf16`` left unset: on where the hardware runs bf16 natively (a GPU with bf16, a CPU with
        AVX512-BF16/AMX, then with ``use_cpu``), off elsewhere. TRL's default (on unless fp16) stops a
        machine without a GPU unless ``use_cpu`` is given; this is the CLI's ``model.dtype: auto`` rule."""
        if self.bf16 is not None or self.fp16:
            return
        import torch

        from ..models.loading import resolve_dtype

        on_gpu = torch.cuda.is_available() and not self.use_cpu
        self.bf16 = resolve_dtype("auto", "cuda" if on_gpu else "cpu") == torch.bfloat16
        if self.bf16 and not on_gpu:
            self.use_cpu = True

    def _validate_fork_fields(self) -> None:
        """Validate the gate and loss fields once; an error names the flat field."""
        loss_keys = self._loss_keys
        gate, loss = self.gate_config, self.loss_config
        names = {f"gate.{cli}": flat for flat, cli in _GATE_KEYS.items()}
        names.update({f"loss.{cli}": flat for flat, cli in loss_keys.items()})
        try:
            gate.validate()
            loss.validate()
            if not self.entropy_temperature > 0:
                raise ConfigError(f"entropy_temperature: must be > 0, got {self.entropy_temperature!r}")
            if not self.advantage_clip > 0:
                raise ConfigError(f"advantage_clip: must be > 0, got {self.advantage_clip!r}")
        except ConfigError as e:
            message = str(e)
            for dotted, flat in names.items():
                message = message.replace(dotted, flat)
            raise ConfigError(message) from None


@dataclass
class ForkGatedConfig(_ForkGatedFields, SFTConfig):
    """Configuration of :class:`~reasonmaxxer.ForkGatedTrainer`: TRL's ``SFTConfig`` plus the fork gate,
    the loss and the base scoring, one flat field each.

    The dataset is not packed or re-tokenized by TRL (``dataset_kwargs`` skips TRL's
    preparation; the trainer tokenizes ``prompt``/``completion`` itself) and its extra
    columns are kept (``remove_unused_columns`` is False).
    """

    kl_anchor: Literal["cached", "exact"] = _like(LossConfig, "kl_anchor")
    kl_on_prompt: bool = _like(LossConfig, "kl_on_prompt")
    anchor_top_k: int = _like(ScoringConfig, "top_k")
    scoring_batch_size: int = _like(ScoringConfig, "batch_size")
    scoring_chunk_size: int = _like(ScoringConfig, "chunk_size")
    base_scores_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Where the base entropy, log-probs and top-k computed by the trainer are "
                                        "cached (resumable shards, one folder per dataset and model); "
                                        "default: <output_dir>/base_scores."})
    drop_uniform_groups: bool = dataclasses.field(
        default=True, metadata={"help": "With a reward column: drop the prompts whose completions all have the same "
                                        "reward (their advantages are 0, so they would only be anchored)."})

    def __post_init__(self) -> None:
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self._default_precision()
        super().__post_init__()
        self._validate_fork_fields()  # validated once here; the trainer reads gate_config and loss_config
        for key in ("anchor_top_k", "scoring_batch_size", "scoring_chunk_size"):
            value = getattr(self, key)
            if value < (0 if key == "anchor_top_k" else 1):
                raise ConfigError(f"{key}: must be >= {0 if key == 'anchor_top_k' else 1}, got {value!r}")
        if self.kl_anchor == "cached" and self.anchor_top_k < 1:
            raise ConfigError("anchor_top_k: kl_anchor cached needs the base's top-k (anchor_top_k >= 1), got 0; "
                              "or set kl_anchor: exact")


@dataclass
class ForkGatedGRPOConfig(_ForkGatedFields, GRPOConfig):
    """Configuration of :class:`~reasonmaxxer.ForkGatedGRPOTrainer`: TRL's ``GRPOConfig`` (sampling,
    rewards, batch sizes) plus the fork gate and the loss, one flat field each.

    GRPO's own loss settings (``beta``, ``epsilon``, ``loss_type``, importance sampling)
    are not used: the loss is the fork-gated one, anchored to the base by the exact KL
    (``kl_coef``) at the non-fork positions, with the base being the model with its
    adapter disabled. ``beta`` is set to 0 so that TRL loads no reference model.
    """

    def __post_init__(self) -> None:
        self.beta = 0.0
        self._default_precision()
        super().__post_init__()
        self._validate_fork_fields()

    _loss_keys: ClassVar[dict[str, str]] = _LOSS_KEYS

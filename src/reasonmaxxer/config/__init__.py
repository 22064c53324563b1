"""The run configuration: typed sections (:mod:`.schema`) read from YAML and overrides (:mod:`.loading`)."""

from .loading import config_from_dict, load_config, parse_overrides, read_yaml, section_dict
from .schema import (
    DEFAULT_PROMPT_TEMPLATE,
    SECTIONS,
    TRAINING_DEFAULTS,
    Config,
    DataConfig,
    EvalConfig,
    GateConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    ScoringConfig,
    SelectionConfig,
    TrackingConfig,
    TrainingMethod,
    grpo_arguments,
    training_defaults,
)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE", "SECTIONS", "TRAINING_DEFAULTS", "Config", "DataConfig", "EvalConfig", "GateConfig",
    "LoraConfig", "LossConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "ScoringConfig", "SelectionConfig", "TrackingConfig",
    "TrainingMethod", "grpo_arguments",
    "config_from_dict", "load_config", "parse_overrides", "read_yaml", "section_dict", "training_defaults",
]

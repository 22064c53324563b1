"""training/configs.py: the public TRL-style configs mirror the CLI's sections and validate once."""

from __future__ import annotations

import dataclasses

import pytest

from reasonmaxxer.config import GateConfig, LossConfig, ScoringConfig
from reasonmaxxer.errors import ConfigError
from reasonmaxxer.training.configs import ForkGatedConfig, ForkGatedGRPOConfig, fork_gated_kwargs


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("flat", "section", "key"), [
    ("gate_tau", GateConfig, "tau"), ("gate_mode", GateConfig, "mode"), ("loss_variant", LossConfig, "variant"),
    ("kl_coef", LossConfig, "kl_coef"), ("kl_anchor", LossConfig, "kl_anchor"), ("anchor_top_k", ScoringConfig, "top_k"),
    ("scoring_chunk_size", ScoringConfig, "chunk_size"),
])
def test_fields_have_the_cli_default_and_help(flat, section, key) -> None:
    mine, cli = _fields(ForkGatedConfig)[flat], _fields(section)[key]
    assert mine.default == cli.default and mine.metadata["help"] == cli.metadata["help"]


def test_every_field_has_help_and_online_has_no_cached_anchor() -> None:
    for cls in (ForkGatedConfig, ForkGatedGRPOConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls) if not f.name.startswith("_"))
    assert "kl_anchor" not in _fields(ForkGatedGRPOConfig) and "anchor_top_k" not in _fields(ForkGatedGRPOConfig)
    online = ForkGatedGRPOConfig("/tmp/x", use_cpu=True, beta=0.3)
    assert online.loss_config.kl_anchor == "exact" and online.beta == 0.0  # no reference model is loaded


def test_sections_round_trip_from_the_cli_config() -> None:
    gate = GateConfig(mode="quantile", quantile=0.3, tau_pos=1.0)
    loss = LossConfig(variant="hinge", kl_coef=0.05, kl_anchor="exact", hinge_margin=0.5)
    args = ForkGatedConfig("/tmp/x", use_cpu=True, **fork_gated_kwargs(gate, loss))
    assert args.gate_config == gate and args.loss_config == loss
    online = ForkGatedGRPOConfig("/tmp/x", use_cpu=True, **fork_gated_kwargs(gate, loss, online=True))
    assert online.gate_config == gate and online.loss_config == loss


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gate_tau": -1.0}, "gate_tau: must be >= 0, got -1.0"),
    ({"gate_quantile": 0.0}, "gate_quantile: must be in (0, 1]"),
    ({"neg_prob_floor": 1.0}, "neg_prob_floor: must be in [0, 1)"),
    ({"kl_on_prompt": True}, "kl_on_prompt: needs kl_anchor: exact"),
    ({"anchor_top_k": 0}, "anchor_top_k: kl_anchor cached needs the base's top-k"),
    ({"entropy_temperature": 0.0}, "entropy_temperature: must be > 0"),
    ({"scoring_batch_size": 0}, "scoring_batch_size: must be >= 1"),
])
def test_bad_values_name_the_flat_field(kwargs, message) -> None:
    with pytest.raises(ConfigError) as err:
        ForkGatedConfig("/tmp/x", use_cpu=True, **kwargs)
    assert message in str(err.value) and "gate." not in str(err.value) and "loss." not in str(err.value)


def test_hf_argument_parser_reads_the_flat_fields() -> None:
    """A TRL user's script parses them from its command line, as any TRL config."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ForkGatedConfig).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--use_cpu", "--gate_tau", "2.2", "--loss_variant", "hinge", "--kl_anchor", "exact"])
    assert args.gate_config.tau == 2.2 and args.loss_config.variant == "hinge" and args.kl_anchor == "exact"
    with pytest.raises(SystemExit):
        HfArgumentParser(ForkGatedConfig).parse_args_into_dataclasses(
            ["--output_dir", "/tmp/x", "--use_cpu", "--gate_mode", "nonsense"])


def test_bf16_unset_follows_the_hardware_as_the_cli() -> None:
    """TRL's default (bf16 unless fp16) stops a machine without a GPU; here it follows model.dtype auto."""
    import torch

    from reasonmaxxer.models.loading import resolve_dtype

    for cls in (ForkGatedConfig, ForkGatedGRPOConfig):
        args = cls("/tmp/x")
        native = resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16
        assert args.bf16 is native
        assert args.use_cpu is (native and not torch.cuda.is_available())
        assert cls("/tmp/x", bf16=False, use_cpu=True).bf16 is False

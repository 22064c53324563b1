"""configs/accelerate/: every file is one accelerate reads, with the strategy its name says."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name, kind, stage", [
    ("ddp.yaml", DistributedType.MULTI_GPU, None),
    ("fsdp.yaml", DistributedType.FSDP, None),
    ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED, 2),
    ("deepspeed_zero3.yaml", DistributedType.DEEPSPEED, 3),
])
def test_accelerate_reads_each_config(name, kind, stage):
    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # raises on a key accelerate does not know
    assert cfg.distributed_type == kind
    assert cfg.mixed_precision == "bf16" and cfg.num_machines == 1 and not cfg.use_cpu
    if stage is not None:
        assert cfg.deepspeed_config["zero_stage"] == stage
    if kind == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2


def test_every_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"]

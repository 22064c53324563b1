"""models/limits.py: the checks against the model's context, heads and precision, before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from reasonmaxxer.errors import ConfigError
from reasonmaxxer.models.limits import check_context, check_precision, check_tensor_parallel, context_length


@pytest.mark.parametrize(("rope", "expected"), [
    (None, 4096),
    ({"rope_type": "default", "rope_theta": 10000.0}, 4096),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, 8192),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0}, 16384),
    # Llama 3.1: the config's own positions already hold the scaled reach, longer than original x factor.
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 256, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "rope_theta": 500000.0}, 4096),
])
def test_context_length_follows_the_rope_scaling(rope, expected) -> None:
    config = LlamaConfig(max_position_embeddings=4096, **({"rope_parameters": rope} if rope else {}))
    assert context_length(config) == expected


def test_a_completion_past_the_context_is_one_line_with_the_room_left() -> None:
    qwen_math_7b = Qwen2Config(max_position_embeddings=4096, num_attention_heads=28, num_key_value_heads=4)
    check_context(qwen_math_7b, longest_prompt=300, max_new_tokens=3072, model_name="Qwen/Qwen2.5-Math-7B")
    with pytest.raises(ConfigError) as err:
        check_context(qwen_math_7b, longest_prompt=300, max_new_tokens=8192, model_name="Qwen/Qwen2.5-Math-7B")
    message = str(err.value)
    assert message.startswith("rollout.max_new_tokens: 8192 new tokens after prompts of up to 300 tokens need 8492")
    assert "more than the 4096 of Qwen/Qwen2.5-Math-7B" in message and "at most 3796" in message
    assert "\n" not in message


def test_paper_presets_fit_their_models_context() -> None:
    """The 7B preset once asked 8192 new tokens of a 4096-position model (Qwen2.5-Math-7B's config)."""
    from pathlib import Path

    from reasonmaxxer.config.loading import load_config

    root = Path(__file__).resolve().parents[1]
    contexts = {"qwen2.5-math-7b.yaml": 4096, "qwen2.5-1.5b.yaml": 32768}  # their config.json's positions
    for name, positions in contexts.items():
        cfg = load_config(root / "configs" / "paper" / name, [])
        check_context(LlamaConfig(max_position_embeddings=positions), longest_prompt=512,
                      max_new_tokens=cfg.rollout.max_new_tokens, model_name=name)


def test_tensor_parallel_must_divide_the_heads() -> None:
    qwen_7b = Qwen2Config(num_attention_heads=28, num_key_value_heads=4)
    check_tensor_parallel(qwen_7b, size=4, model_name="Qwen/Qwen2.5-7B")
    with pytest.raises(ConfigError, match="rollout.vllm_tensor_parallel_size: 8 does not divide the 28 attention heads"):
        check_tensor_parallel(qwen_7b, size=8, model_name="Qwen/Qwen2.5-7B")
    # 8 GPUs over 4 key/value heads: each replicated twice, as vLLM does.
    check_tensor_parallel(Qwen2Config(num_attention_heads=32, num_key_value_heads=4), size=8, model_name="m")
    with pytest.raises(ConfigError, match="3 neither divides the 8 key/value heads of m nor is a multiple"):
        check_tensor_parallel(Qwen2Config(num_attention_heads=12, num_key_value_heads=8), size=3, model_name="m")


def test_bf16_on_a_gpu_before_ampere_is_refused(monkeypatch) -> None:
    """No GPU here: the device's capability is what torch would report for a T4 (7.5) and an A100 (8.0)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ConfigError, match=r"model.dtype: bfloat16 on Tesla T4 \(compute capability 7.5\)"):
        check_precision(torch.bfloat16, torch.device("cuda"))
    check_precision(torch.float32, torch.device("cuda"))
    check_precision(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    check_precision(torch.bfloat16, torch.device("cuda"))


def test_cli_refuses_a_completion_past_the_tiny_models_context_before_any_work(tiny_model_dir, tmp_path, capsys):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.testing import tiny_run_args

    run = tmp_path / "run"
    assert train_main(tiny_run_args(tiny_model_dir, run, "--rollout.max_new_tokens", "600")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rollout.max_new_tokens: 600 new tokens") and "of 512" not in err
    assert "more than the 512 of" in err and len(err.splitlines()) == 1
    assert not (run / "problems.jsonl").exists()  # nothing ran


def test_rollouts_check_the_real_prompts(tiny_model_dir, tmp_path):
    """The stage knows the prompts' lengths: 500 new tokens fit alone but not after a 20-token prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonmaxxer.config.loading import load_config
    from reasonmaxxer.data.problem import Problem
    from reasonmaxxer.stages.rollouts import run_rollouts

    cfg = load_config(None, ["--rollout.max_new_tokens", "500"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    problems = [Problem(id="p", prompt="What is 12 + 30? Think step by step.", answer="42", kind="add")]
    with pytest.raises(ConfigError, match=r"500 new tokens after prompts of up to \d\d+ tokens need"):
        run_rollouts(model, AutoTokenizer.from_pretrained(tiny_model_dir), problems, cfg.data, cfg.rollout,
                     tmp_path / "r.jsonl", seed=0, progress=False)

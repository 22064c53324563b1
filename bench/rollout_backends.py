"""Rollout throughput of the three backends on the same prompts: fast, HF ``generate`` and vLLM.

    python bench/rollout_backends.py                          # the demo: its 48 prompts x 8 samples
    python bench/rollout_backends.py --backends fast,vllm --config configs/qwen2.5-math-7b.yaml
    python bench/rollout_backends.py --problems 4 --max-new-tokens 16   # a smoke run
    python bench/rollout_backends.py --model.name_or_path PATH          # any config key, as in train.py

Every backend samples the config's training problems with the config's rollout settings
(samples, temperature, top-p, max new tokens, batch size) through ``run_rollouts``, one
after the other in this process. vLLM's engine load is timed apart from its sampling, and
the engine is shut down before the next backend. A backend that cannot run here (vLLM not
installed) is reported and skipped, so the script runs with whatever an image has. The
last line is ``<backend>_vs_hf=<tokens/s ratio>`` for each backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reasonmaxxer.config import load_config  # noqa: E402
from reasonmaxxer.data.sources import load_problems  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from reasonmaxxer.stages.rollouts import run_rollouts  # noqa: E402
from reasonmaxxer.stages.sampling import resolve_prompt_format  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--backends", default="fast,hf,vllm", help="in the order they run (the first also warms up)")
    ap.add_argument("--problems", type=int, default=0, help="only the first N training problems (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="override rollout.max_new_tokens (0: the config's)")
    ap.add_argument("--vllm-max-model-len", type=int, default=512)
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    problems, _ = load_problems(cfg.data, seed=cfg.seed)
    problems = problems[: args.problems] if args.problems else problems
    rollout = cfg.rollout
    if args.max_new_tokens:
        rollout = dataclasses.replace(rollout, max_new_tokens=args.max_new_tokens)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    prompt_format = resolve_prompt_format(tokenizer, cfg.data, log=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{cfg.model.name_or_path} on {device}: {len(problems)} prompts x {rollout.num_samples} samples, "
          f"up to {rollout.max_new_tokens} new tokens, batch_size {rollout.batch_size}, "
          f"{torch.get_num_threads()} threads")
    model = None
    rates: dict[str, float] = {}
    for backend in args.backends.split(","):
        load_s = 0.0
        if backend == "vllm":
            if importlib.util.find_spec("vllm") is None:
                print("vllm: skipped (vLLM is not installed here)")
                continue
            from reasonmaxxer.stages.vllm_backend import VllmSampler

            start = time.perf_counter()
            sampler = VllmSampler(path, dtype=cfg.model.dtype, seed=cfg.seed, gpu_memory_utilization=0.3,
                                  max_model_len=args.vllm_max_model_len)
            load_s = time.perf_counter() - start
        else:
            if model is None:
                model = load_model(path, dtype=cfg.model.dtype, device=device).eval()
            sampler = model
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_rollouts(sampler, tokenizer, problems, cfg.data, dataclasses.replace(rollout, backend=backend),
                                   Path(tmp) / "rollouts.jsonl", seed=cfg.seed, progress=False,
                                   prompt_format=prompt_format)
        if backend == "vllm":
            sampler.close()
        rates[backend] = summary["tokens_per_s"]
        loading = f", engine load {load_s:.1f} s (not counted)" if backend == "vllm" else ""
        print(f"{backend}: {summary['new_tokens_this_run']} tokens, {rates[backend]:.1f} tokens/s, "
              f"mean reward {summary['mean_reward']:.3f}{loading}")
    if "hf" in rates:
        print(" ".join(f"{b}_vs_hf={r / rates['hf']:.3f}" for b, r in rates.items() if b != "hf"))


if __name__ == "__main__":  # vLLM spawns its workers: the guard keeps them from re-running this
    main()

"""Rollout throughput: the fast backend against the naive `model.generate` call.

    python bench/rollout.py                       # SmolLM2, 8 problems x 4 samples, 128 new tokens
    python bench/rollout.py --variants hf,hf_static,hf_compiled,fast
    python bench/rollout.py --model tiny          # smoke test

Every variant samples the same prompts with the same settings (chat template, T, top-p,
max new tokens, batch size); each is timed over whole batches, repeated, alternating.
Variants: `hf` (one `model.generate` call, dynamic KV cache), `hf_static` (the same with
a static, preallocated cache), `hf_compiled` (static cache and the forward compiled by
torch.compile; its first call, the compilation, is timed apart), `fast` (our backend).
Generated tokens per second count the tokens kept (up to and including EOS). The last
line is `throughput_ratio=<fast / hf>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.config.schema import DataConfig, RolloutConfig  # noqa: E402
from reasonmaxxer.data.builtin import builtin_arithmetic  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.stages.sampling import chat_prompt_ids, eos_token_ids, generate_batch  # noqa: E402
from reasonmaxxer.testing import build_tiny_model_dir  # noqa: E402


def hf_generate(model, tokenizer, prompts, cfg, eos, *, seed: int, compiled: bool):
    """``model.generate`` as the hf backend calls it, with a static cache (and torch.compile)."""
    from transformers import CompileConfig

    from reasonmaxxer.stages.sampling import cut_at_eos

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    extra: dict = {"disable_compile": True}
    if compiled:
        compile_config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        compile_config._compile_all_devices = True  # generate compiles on accelerators only, unless told
        extra = {"compile_config": compile_config}
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                         num_return_sequences=cfg.num_samples, eos_token_id=sorted(eos), pad_token_id=pad,
                         cache_implementation="static", **extra)
    generated = out[:, width:].tolist()
    n = cfg.num_samples
    return [[cut_at_eos(generated[i * n + j], eos) for j in range(n)] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default="hf,fast")
    args = ap.parse_args()
    variants = args.variants.split(",")
    path = str(build_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny")) if args.model == "tiny" else args.model
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    problems = builtin_arithmetic(args.problems, seed=1, kinds=("add", "mul"))
    prompts = [chat_prompt_ids(tokenizer, p, DataConfig()) for p in problems]
    base = RolloutConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                         batch_size=args.problems * args.samples)
    eos = eos_token_ids(model, tokenizer)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    lengths: dict[str, list[int]] = {v: [] for v in variants}
    first_call: dict[str, float] = {}

    def run(variant: str, seed: int) -> list[list[tuple[list[int], str]]]:
        if variant in ("hf", "fast"):
            return generate_batch(model, tokenizer, prompts, dataclasses.replace(base, backend=variant), eos, seed=seed)
        return hf_generate(model, tokenizer, prompts, base, eos, seed=seed, compiled=variant == "hf_compiled")

    for variant in variants:  # warm-up call per variant (compilation, allocator), timed apart
        t0 = time.perf_counter()
        run(variant, seed=10_000)
        first_call[variant] = time.perf_counter() - t0
    for rep in range(args.reps):
        for variant in variants:
            t0 = time.perf_counter()
            out = run(variant, seed=rep)
            dt = time.perf_counter() - t0
            n_tokens = sum(len(toks) for rows in out for toks, _ in rows)
            rates[variant].append(n_tokens / dt)
            lengths[variant] += [len(toks) for rows in out for toks, _ in rows]
    print(f"model={args.model} batch={args.problems}x{args.samples} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    for variant, r in rates.items():
        ls = lengths[variant]
        print(f"{variant:>11}: {statistics.median(r):7.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in r)}); "
              f"completion length mean {statistics.mean(ls):.1f}, max {max(ls)}; "
              f"first call {first_call[variant]:.1f} s")
    for variant in variants:
        if variant != "hf":
            print(f"{variant}_vs_hf={statistics.median(rates[variant]) / statistics.median(rates['hf']):.2f}")
    print(f"throughput_ratio={statistics.median(rates['fast']) / statistics.median(rates['hf']):.2f}")


if __name__ == "__main__":
    main()

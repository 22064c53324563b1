"""Rollout throughput: the fast backend against the naive `model.generate` call.

    python bench/rollout.py                       # SmolLM2, 8 problems x 4 samples, 128 new tokens
    python bench/rollout.py --model tiny          # smoke test

Both backends sample the same prompts with the same settings (chat template, T, top-p,
max new tokens, batch size); each is timed over whole batches, repeated, alternating.
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

from reasonmaxxer.config import DataConfig, RolloutConfig  # noqa: E402
from reasonmaxxer.modeling import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.problems import builtin_arithmetic  # noqa: E402
from reasonmaxxer.rollouts import chat_prompt_ids, eos_token_ids, generate_batch  # noqa: E402
from reasonmaxxer.testing import build_tiny_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    path = str(build_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny")) if args.model == "tiny" else args.model
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    problems = builtin_arithmetic(args.problems, seed=1, kinds=("add", "mul"))
    prompts = [chat_prompt_ids(tokenizer, p, DataConfig()) for p in problems]
    base = RolloutConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                         batch_size=args.problems * args.samples)
    eos = eos_token_ids(model, tokenizer)
    rates: dict[str, list[float]] = {"hf": [], "fast": []}
    lengths: dict[str, list[int]] = {"hf": [], "fast": []}
    for rep in range(args.reps):
        for backend in ("hf", "fast"):
            cfg = dataclasses.replace(base, backend=backend)
            t0 = time.perf_counter()
            out = generate_batch(model, tokenizer, prompts, cfg, eos, seed=rep)
            dt = time.perf_counter() - t0
            n_tokens = sum(len(toks) for rows in out for toks, _ in rows)
            rates[backend].append(n_tokens / dt)
            lengths[backend] += [len(toks) for rows in out for toks, _ in rows]
    print(f"model={args.model} batch={args.problems}x{args.samples} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    for backend, r in rates.items():
        ls = lengths[backend]
        print(f"{backend:>5}: {statistics.median(r):7.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in r)}); "
              f"completion length mean {statistics.mean(ls):.1f}, max {max(ls)}")
    print(f"throughput_ratio={statistics.median(rates['fast']) / statistics.median(rates['hf']):.2f}")


if __name__ == "__main__":
    main()

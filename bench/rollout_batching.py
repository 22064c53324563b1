"""Rollout batches sized by count (rollout.batch_size) against a KV-cache token budget (rollout.batch_tokens).

    python bench/rollout_batching.py                                  # SmolLM2, 12 problems x 20 samples
    python bench/rollout_batching.py --budget 24000 --max-new-tokens 96
    python bench/rollout_batching.py --model tiny                      # smoke test

With 20 samples per prompt (the paper's) and ``batch_size: 32`` a call holds one prompt:
20 sequences. A token budget packs whole prompts while prompts x samples x (longest
prompt + max new tokens) fits, so the call holds as many sequences as the memory allows.
Both arms sample the same problems with the fast backend, one after the other in this
process (the first arm also warms up: ``--order budget,count`` swaps them), through ``run_rollouts``; printed per arm: the
calls, sequences per call (mean and max), generated tokens/s. The last line is
``throughput_ratio=<budget / count>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.config.schema import DataConfig, RolloutConfig  # noqa: E402
from reasonmaxxer.data.builtin import builtin_arithmetic  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from reasonmaxxer.stages.rollouts import rollout_batches, run_rollouts  # noqa: E402
from reasonmaxxer.stages.sampling import prompt_ids, resolve_prompt_format  # noqa: E402
from reasonmaxxer.testing import build_tiny_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="the count arm's rollout.batch_size")
    ap.add_argument("--budget", type=int, default=16000, help="the budget arm's rollout.batch_tokens")
    ap.add_argument("--order", default="count,budget", help="which arm runs first (it also warms up)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    path = str(build_tiny_model_dir(tempfile.mkdtemp())) if args.model == "tiny" else resolve_model_path(args.model)
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    data = DataConfig(kinds=["add", "mul"])
    problems = builtin_arithmetic(args.problems, seed=7, kinds=data.kinds)
    base = RolloutConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=0.6, top_p=0.95,
                         batch_size=args.batch_size)
    configs = {"count": base, "budget": dataclasses.replace(base, batch_tokens=args.budget)}
    arms = {name: configs[name] for name in args.order.split(",")}
    prompt_format = resolve_prompt_format(tokenizer, data, log=False)
    lengths = {p.id: len(prompt_ids(tokenizer, p, data, prompt_format)) for p in problems}
    order = sorted(problems, key=lambda p: (lengths[p.id], p.id))
    print(f"{args.model}: {args.problems} problems x {args.samples} samples, {args.max_new_tokens} new tokens, "
          f"{model.dtype}, {torch.get_num_threads()} threads")
    rates = {}
    for name, cfg in arms.items():
        calls = [len(b) * cfg.num_samples for b in rollout_batches(order, [lengths[p.id] for p in order], cfg)]
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_rollouts(model, tokenizer, problems, data, cfg, Path(tmp) / "r.jsonl", seed=0,
                                   progress=False, prompt_format=prompt_format)
        rates[name] = summary["tokens_per_s"]
        setting = f"batch_size {cfg.batch_size}" if name == "count" else f"batch_tokens {cfg.batch_tokens}"
        print(f"{name:6s} ({setting}): {len(calls)} calls, sequences per call mean {sum(calls) / len(calls):.1f} "
              f"max {max(calls)}, {summary['new_tokens_this_run']} tokens, {rates[name]:.1f} tokens/s")
    print(f"throughput_ratio={rates['budget'] / rates['count']:.3f}")


if __name__ == "__main__":
    main()

"""Cost of a fork-gated training step against a plain LoRA step on the same batch.

    python bench/step.py                 # SmolLM2-135M, batch 8 x 192, LoRA r16 all-linear, fp32
    python bench/step.py --model tiny    # the in-process tiny model (seconds; a smoke test)
    python bench/step.py --model qwen2.5-0.5b --batch 1 --prompt-len 128 --completion-len 896 --reps 3
                                         # a random Qwen2.5-0.5B (vocab 151,936): fp32 on CPU, bf16 on a GPU

Each repetition runs one step of every kind in turn (plain, gated with the cached top-k
anchor, gated with the exact adapter-disabled anchor), each a forward, a backward and an
AdamW step on the same PEFT model and batch; the medians are compared. The last line is
`cached_ratio=<x> exact_ratio=<y>`.

With ``--ab-backward`` each repetition also runs both gated steps with the fused head's
recomputing backward (``factor_backward=False``: the frozen head's logits are formed again in
the backward) and a line before the last gives, per anchor, the median over repetitions of
the paired ratio factored / recomputed: the step-level effect of the factored backward,
timed in one process.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN, random_qwen  # noqa: E402  (bench/shapes.py)

import reasonmaxxer.models.forward as forward_module  # noqa: E402
from reasonmaxxer.config.loading import load_config  # noqa: E402
from reasonmaxxer.models.forward import completion_logits  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.stages.scoring import score_batch  # noqa: E402
from reasonmaxxer.testing import build_tiny_model_dir  # noqa: E402
from reasonmaxxer.training.trainer import build_trainer  # noqa: E402
from reasonmaxxer.utils.sequences import pack_batch  # noqa: E402


def step_kinds(model, tokenizer, workdir: Path, *, batch: int, prompt_len: int, completion_len: int,
               top_k: int) -> dict[str, Callable[[], None]]:
    """One training step of each kind on the same PEFT model and random batch (bench/gpu.py uses it too).

    Puts a fresh LoRA adapter on ``model`` (through build_trainer). Returns, per kind
    (plain, cached, exact), a callable that runs one forward, backward and AdamW step.
    """
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    rollouts = [{"prompt_ids": torch.randint(3, vocab, (prompt_len,)).tolist(),
                 "completion_ids": torch.randint(3, vocab, (completion_len,)).tolist()}
                for _ in range(batch)]
    packed = {k: v.to(device) for k, v in pack_batch([r["prompt_ids"] for r in rollouts],
                                                     [r["completion_ids"] for r in rollouts],
                                                     tokenizer.pad_token_id).items()}
    model.eval()
    stats = score_batch(model, packed, top_k=top_k, chunk_size=128, entropy_temperature=0.6)
    scores = {i: {k: v[i].cpu() for k, v in stats.items()} for i in range(batch)}
    del stats, packed
    selection = [{"rollout_index": i, "advantage": 1.0 if i % 2 else -1.0} for i in range(batch)]
    cfg = load_config(None, ["--scoring.top_k", str(top_k), "--lora.dropout", "0.0"])
    trainer = build_trainer(cfg, model, tokenizer, rollouts, selection, scores, workdir / "ckpt",
                            entropy_temperature=0.6)
    peft_model = trainer.model
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = {k: v.to(device) for k, v in trainer.data_collator([trainer.train_dataset[i]
                                                                for i in range(batch)]).items()}

    def plain_loss() -> torch.Tensor:
        logits = completion_logits(peft_model, data)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), data["completion_ids"].flatten(),
                                                reduction="none").view_as(data["completion_ids"])
        mask = data["completion_mask"].float()
        return (nll * mask).sum() / mask.sum()

    def gated_loss(anchor: str) -> torch.Tensor:
        trainer.loss_cfg.kl_anchor = anchor
        return trainer.compute_loss(peft_model, dict(data))

    def stepper(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return {"plain": stepper(plain_loss), "cached": stepper(lambda: gated_loss("cached")),
            "exact": stepper(lambda: gated_loss("exact"))}


def recomputing(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the fused head's backward recomputing its logits (``factor_backward=False``)."""
    def run() -> None:
        factored = forward_module.fused_head_logprobs
        forward_module.fused_head_logprobs = functools.partial(factored, factor_backward=False)
        try:
            step()
        finally:
            forward_module.fused_head_logprobs = factored
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help=f"model name/path, 'tiny', or a random-init shape: {', '.join(QWEN)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--ab-backward", action="store_true",
                    help="also time both gated steps with the recomputing backward (factor_backward=False)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    tmp = tempfile.mkdtemp()
    if args.model in QWEN:
        cuda = torch.cuda.is_available()
        model, tokenizer = random_qwen(QWEN[args.model], device="cuda" if cuda else "cpu",
                                       dtype=torch.bfloat16 if cuda else torch.float32)
    else:
        path = str(build_tiny_model_dir(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        tokenizer = load_tokenizer(path)
        model = load_model(path, dtype="auto")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    kinds = step_kinds(model, tokenizer, Path(tmp), batch=args.batch, prompt_len=args.prompt_len,
                       completion_len=args.completion_len, top_k=args.top_k)
    if args.ab_backward:
        kinds |= {f"{anchor}_recompute": recomputing(kinds[anchor]) for anchor in ("cached", "exact")}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
        for name, step in kinds.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
    print(f"model={args.model} device={device} dtype={next(model.parameters()).dtype} batch={args.batch}x"
          f"{args.prompt_len + args.completion_len} vocab={vocab} torch_threads={torch.get_num_threads()}")
    for name, ts in times.items():
        spread = f"{min(ts):.3f}-{max(ts):.3f}"
        print(f"{name:>16}: median {statistics.median(ts):.3f} s  (min-max {spread}, n={len(ts)})")
    if args.ab_backward:
        paired = {anchor: statistics.median(f / r for f, r in zip(times[anchor], times[f"{anchor}_recompute"]))
                  for anchor in ("cached", "exact")}
        print(f"factored_vs_recompute_cached={paired['cached']:.3f} factored_vs_recompute_exact={paired['exact']:.3f}")
    plain = statistics.median(times["plain"])
    print(f"cached_ratio={statistics.median(times['cached']) / plain:.3f} "
          f"exact_ratio={statistics.median(times['exact']) / plain:.3f}")


if __name__ == "__main__":
    main()

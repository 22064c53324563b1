"""fp32 against bf16 on the same micro-batches: scoring, the fork gate, the gated step.

    python bench/numerics.py                  # SmolLM2-135M, fresh completions of new problems
    python bench/numerics.py --model tiny     # the in-process tiny model (seconds; a smoke test)

The same weights are loaded twice, in float32 and in bfloat16, and the same micro-batches
(prompts of the built-in task, completions sampled from the fp32 model at T 0.6) go through
what a run does with them in either dtype: scoring (entropy at temperature 1, the sampled
token's log-prob, the top-k), the threshold gate at ``--tau``, and one fork-gated training
step (cached top-k anchor, each dtype's own top-k) from the same LoRA weights on the same
forks (the fp32 entropy gates both steps, so the step's difference is bf16's arithmetic;
how often the gate itself flips is the mask agreement). Printed, per quantity, the bf16-minus-fp32 difference; the last line holds
the figures that ``tests/test_numerics.py`` bounds:

    entropy_max=… entropy_p99=… mask_agreement_off_band=… loss_abs=… grad_cosine=… kl_rel=…
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.config.loading import load_config  # noqa: E402
from reasonmaxxer.data.builtin import builtin_arithmetic  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.stages.scoring import score_batch  # noqa: E402
from reasonmaxxer.testing import build_tiny_model_dir  # noqa: E402
from reasonmaxxer.training.trainer import build_trainer  # noqa: E402
from reasonmaxxer.utils.sequences import pack_batch  # noqa: E402

SUFFIX = "Reason briefly, then give the final answer on the last line as 'Answer: <number>'."


def sample_rollouts(model: Any, tokenizer: Any, *, problems: int, samples: int, max_new_tokens: int,
                     seed: int) -> list[dict[str, Any]]:
    """Chat-formatted prompts of the built-in task and completions sampled at T 0.6 / top-p 0.95."""
    drawn = builtin_arithmetic(problems, split="train", kinds=["add", "mul"], seed=seed)
    rollouts = []
    torch.manual_seed(seed)
    for problem in drawn:
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{problem.prompt}\n{SUFFIX}"}],
                                             tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(prompt.repeat(samples, 1), attention_mask=torch.ones_like(prompt).repeat(samples, 1),
                                 do_sample=True, temperature=0.6, top_p=0.95,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, prompt.shape[1]:]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            rollouts.append({"prompt_ids": prompt[0].tolist(), "completion_ids": ids or [tokenizer.eos_token_id]})
    return rollouts


def peaked_tiny_model_dir(path: Path, head_scale: float = 25.0) -> str:
    """The tiny test model with its LM head scaled up: a random init is nearly uniform over the
    vocabulary (every entropy ~log V), which would leave nothing for bf16 to get wrong."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(folder)
    return str(folder)


def _scores(model: Any, rollouts: list[dict[str, Any]], pad_id: int, micro_batch: int, top_k: int
            ) -> dict[int, dict[str, torch.Tensor]]:
    scores: dict[int, dict[str, torch.Tensor]] = {}
    for s in range(0, len(rollouts), micro_batch):
        part = rollouts[s : s + micro_batch]
        packed = pack_batch([r["prompt_ids"] for r in part], [r["completion_ids"] for r in part], pad_id)
        with torch.no_grad():
            stats = score_batch(model, packed, top_k=top_k, chunk_size=128, entropy_temperature=1.0)
        for j, r in enumerate(part):
            n = len(r["completion_ids"])
            scores[s + j] = {k: v[j, :n].float() if v.is_floating_point() else v[j, :n] for k, v in stats.items()}
    return scores


def _step(model: Any, tokenizer: Any, rollouts: list[dict[str, Any]], scores: dict[int, dict[str, torch.Tensor]],
          lora_state: dict[str, torch.Tensor] | None, tau: float, top_k: int, workdir: Path
          ) -> tuple[float, float, torch.Tensor, dict[str, torch.Tensor]]:
    """One gated loss and its LoRA gradient; LoRA weights from ``lora_state`` (None: make them)."""
    selection = [{"rollout_index": i, "advantage": 1.0 if i % 2 else -1.0} for i in range(len(rollouts))]
    cfg = load_config(None, ["--scoring.top_k", str(top_k), "--lora.dropout", "0.0", "--gate.tau", str(tau),
                             "--loss.kl_anchor", "cached"])
    trainer = build_trainer(cfg, model, tokenizer, rollouts, selection, scores, workdir, entropy_temperature=1.0)
    peft_model = trainer.model
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if lora_state is None:  # B is zero at init: give it a seeded value so the policy has moved
        gen = torch.Generator().manual_seed(1)
        lora_state = {n: (torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in n else 0.1)) for n, p in lora.items()}
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(lora_state[n].to(p.dtype))
    peft_model.train()
    data = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rollouts))])
    loss = trainer.compute_loss(peft_model, data)
    loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in lora.values()])
    kl = float(trainer._metrics["train"]["kl_term"][-1])
    return loss.item(), kl, grad, lora_state


def fp32_vs_bf16(path: str, *, problems: int = 6, samples: int = 4, max_new_tokens: int = 96, tau: float | None = 2.2,
                 band: float = 0.05, micro_batch: int = 8, top_k: int = 64, seed: int = 1) -> dict[str, float]:
    """The bf16-minus-fp32 differences on the same micro-batches (see the module docstring)."""
    tokenizer = load_tokenizer(path)
    m32 = load_model(path, dtype="float32", device="cpu").eval()
    m16 = load_model(path, dtype="bfloat16", device="cpu").eval()
    rollouts = sample_rollouts(m32, tokenizer, problems=problems, samples=samples, max_new_tokens=max_new_tokens,
                               seed=seed)
    s32 = _scores(m32, rollouts, tokenizer.pad_token_id, micro_batch, top_k)
    s16 = _scores(m16, rollouts, tokenizer.pad_token_id, micro_batch, top_k)
    h32 = torch.cat([s32[i]["entropy"] for i in range(len(rollouts))])
    h16 = torch.cat([s16[i]["entropy"] for i in range(len(rollouts))])
    lp32 = torch.cat([s32[i]["logp"] for i in range(len(rollouts))])
    lp16 = torch.cat([s16[i]["logp"] for i in range(len(rollouts))])
    if tau is None:  # a model of its own scale (the tiny one's entropies sit near log V): its fp32 median
        tau = float(h32.median())
    dh = (h16 - h32).abs()
    off_band = (h32 - tau).abs() > band
    agree = ((h32 > tau) == (h16 > tau))
    # The step on the same forks (the fp32 entropy gates both), so the difference is the
    # bf16 forward and backward's own; the gate's flips are the mask agreement above.
    same_forks = {i: {**s16[i], "entropy": s32[i]["entropy"]} for i in s16}
    with tempfile.TemporaryDirectory() as tmp:
        micro = rollouts[:micro_batch]
        loss32, kl32, g32, state = _step(m32, tokenizer, micro, s32, None, tau, top_k, Path(tmp) / "a")
        loss16, kl16, g16, _ = _step(m16, tokenizer, micro, same_forks, state, tau, top_k, Path(tmp) / "b")
    return {
        "tau": tau,
        "tokens": float(h32.numel()),
        "fork_share_fp32": float((h32 > tau).float().mean()),
        "fork_share_bf16": float((h16 > tau).float().mean()),
        "entropy_mean_abs": float(dh.mean()),
        "entropy_p99": float(dh.quantile(0.99)),
        "entropy_max": float(dh.max()),
        "logp_p99": float((lp16 - lp32).abs().quantile(0.99)),
        "share_in_band": float((~off_band).float().mean()),
        "mask_agreement_off_band": float(agree[off_band].float().mean()),
        "mask_agreement_all": float(agree.float().mean()),
        "loss_fp32": loss32,
        "loss_bf16": loss16,
        "loss_abs": abs(loss16 - loss32),
        "kl_fp32": kl32,
        "kl_bf16": kl16,
        "kl_rel": abs(kl16 - kl32) / abs(kl32),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
        "grad_norm_ratio": float(g16.norm() / g32.norm()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name/path, or 'tiny'")
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--tau", type=float, default=None,
                    help="the gate's threshold (default: the demo's 2.2 nats; with --model tiny its fp32 median)")
    ap.add_argument("--band", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = peaked_tiny_model_dir(Path(tmp) / "tiny") if args.model == "tiny" else args.model
        tau = args.tau if args.tau is not None else (None if args.model == "tiny" else 2.2)
        r = fp32_vs_bf16(path, problems=args.problems, samples=args.samples, max_new_tokens=args.max_new_tokens,
                         tau=tau, band=args.band, seed=args.seed)
    print(f"model={args.model} tokens={int(r['tokens'])} tau={r['tau']} band=±{args.band} seed={args.seed} "
          f"torch_threads={torch.get_num_threads()}")
    print("| quantity | fp32 | bf16 | difference (abs.) |")
    print("|---|---|---|---|")
    print(f"| entropy (nats), mean / p99 / max | | | {r['entropy_mean_abs']:.4f} / {r['entropy_p99']:.4f} / "
          f"{r['entropy_max']:.4f} |")
    print(f"| sampled token log-prob, p99 | | | {r['logp_p99']:.4f} |")
    print(f"| fork share (H > tau) | {r['fork_share_fp32']:.4f} | {r['fork_share_bf16']:.4f} | |")
    print(f"| fork-mask agreement, positions off the ±{args.band} band ({1 - r['share_in_band']:.1%} of them) | | | "
          f"{r['mask_agreement_off_band']:.4f} |")
    print(f"| fork-mask agreement, all positions | | | {r['mask_agreement_all']:.4f} |")
    print(f"| gated loss, same forks | {r['loss_fp32']:.5f} | {r['loss_bf16']:.5f} | {r['loss_abs']:.4f} |")
    print(f"| KL term (cached top-k), same forks | {r['kl_fp32']:.5f} | {r['kl_bf16']:.5f} | rel {r['kl_rel']:.4f} |")
    print(f"| LoRA gradient, same forks | | | cosine {r['grad_cosine']:.4f}, norm ratio {r['grad_norm_ratio']:.4f} |")
    keys = ("entropy_max", "entropy_p99", "mask_agreement_off_band", "loss_abs", "grad_cosine", "kl_rel")
    print(" ".join(f"{k}={r[k]:.5f}" for k in keys))


if __name__ == "__main__":
    main()

"""Peak memory of scoring and of the fork-gated loss against a plain LoRA step, at a
Qwen-sized vocabulary (152k) and a 4096-token sequence, on a tiny model.

    python bench/memory.py                 # vocab 152064, 1 x 4096 tokens
    python bench/memory.py --vocab 32000 --length 1024   # quicker

Each phase runs in its own process: build the model and the batch, reset the peak-RSS
counter (Linux: /proc/self/clear_refs), run the phase, read the peak (VmHWM) and report
it above the resident memory before the phase. Phases: `plain` (LoRA forward + masked
cross-entropy + backward), `cached` / `exact` (the same with the fork-gated loss and its
two KL anchors), `scoring` (the chunked teacher-forced base pass). The last line is
`memory_ratio=<max(cached, scoring) / plain>`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def run_phase(phase: str, vocab: int, length: int, top_k: int) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from reasonmaxxer.core.gate import fork_mask
    from reasonmaxxer.core.kl import topk_kl
    from reasonmaxxer.core.logprobs import policy_logprobs, policy_logprobs_and_kl
    from reasonmaxxer.core.loss import fork_gated_loss
    from reasonmaxxer.models.forward import completion_logits
    from reasonmaxxer.stages.scoring import score_batch
    from reasonmaxxer.testing import build_tiny_model_dir
    from reasonmaxxer.utils.sequences import pack_batch

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(build_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny"))
    config.vocab_size = vocab  # token ids are random: the tiny tokenizer is not used
    config.max_position_embeddings = max(config.max_position_embeddings, length + 8)
    base = AutoModelForCausalLM.from_config(config)
    base.eval()
    prompt_len = 64
    prompt = torch.randint(3, vocab, (prompt_len,)).tolist()
    completion = torch.randint(3, vocab, (length - prompt_len,)).tolist()
    batch = pack_batch([prompt], [completion], pad_id=0)
    if phase in ("cached", "exact"):
        stats = score_batch(base, batch, top_k=top_k, chunk_size=256, entropy_temperature=1.0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter

    def policy_logits():
        return completion_logits(model, batch)

    if phase == "plain":
        logits = policy_logits()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["completion_ids"].flatten(),
                                                reduction="none")
        loss = (nll * batch["completion_mask"].flatten()).sum() / batch["completion_mask"].sum()
        loss.backward()
    elif phase in ("cached", "exact"):
        logits = policy_logits()
        cached = phase == "cached"
        if cached:  # as ForkGatedTrainer.compute_loss does
            policy_logp, policy_topk, _ = policy_logprobs(logits, batch["completion_ids"], stats["topk_ids"])
            kl = topk_kl(stats["topk_logp"], policy_topk)
        else:
            with torch.no_grad(), model.disable_adapter():
                base_logits = policy_logits()
            policy_logp, _, _, kl = policy_logprobs_and_kl(logits, batch["completion_ids"], base_logits)
            del base_logits
        forks = fork_mask(stats["entropy"], batch["completion_mask"], mode="quantile", quantile=0.2)
        loss, _ = fork_gated_loss(policy_logp, stats["logp"], torch.tensor([1.0]), forks, batch["completion_mask"],
                                  kl, kl_coef=0.2)
        loss.backward()
    elif phase == "scoring":
        with torch.no_grad():
            score_batch(base, batch, top_k=top_k, chunk_size=128, entropy_temperature=0.6)
    else:
        raise SystemExit(f"unknown phase {phase}")
    peak = _rss_kb("VmHWM")
    return {"phase": phase, "peak_above_start_mb": (peak - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="plain,cached,scoring,exact")
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.vocab, args.length, args.top_k)))
        return
    results = {}
    for phase in args.phases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--vocab", str(args.vocab),
                               "--length", str(args.length), "--top-k", str(args.top_k)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-2000:]}")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_start_mb"]
    bxtxv = args.length * args.vocab * 4 / 2**20
    print(f"vocab={args.vocab} length={args.length} (one fp32 B x T x V tensor = {bxtxv:.0f} MB)")
    for phase, mb in results.items():
        print(f"{phase:>8}: peak {mb:8.0f} MB above start ({mb / bxtxv:.2f} x B*T*V)")
    plain = results["plain"]
    worst = max(results.get("cached", 0.0), results.get("scoring", 0.0))
    if "exact" in results:
        print(f"exact_ratio={results['exact'] / plain:.3f}")
    print(f"memory_ratio={worst / plain:.3f}")


if __name__ == "__main__":
    main()

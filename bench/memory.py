"""Peak memory of scoring and of the fork-gated loss against a plain LoRA step, at a
Qwen-sized vocabulary (152k) and an 8192-token sequence, on a tiny model.

    python bench/memory.py                 # vocab 152064, 1 x 8192 tokens (the plain step peaks near 20 GB)
    python bench/memory.py --length 4096   # half of that
    python bench/memory.py --vocab 32000 --length 1024   # quicker

Each phase runs in its own process: build the model and the batch, reset the peak-RSS
counter (Linux: /proc/self/clear_refs), run the phase, read the peak (VmHWM) and report
it above the resident memory before the phase. Phases: `plain` (LoRA forward + masked
cross-entropy + backward, through the model's own head: full logits), `cached` / `exact`
(the fork-gated loss with its two KL anchors, through the same function as
``ForkGatedTrainer.compute_loss``), `scoring` (the chunked teacher-forced base pass).

Each phase's peak is also given as a multiple of one fp32 B x T x V tensor (the logits
the gated step no longer holds). The exact anchor's multiple has its own line,
`exact_logits_multiple=<y>`; the last line is
`memory_ratio=<cached / plain> logits_multiple=<cached peak / fp32 B x T x V bytes>`.
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
    from reasonmaxxer.core.loss import fork_gated_loss
    from reasonmaxxer.models.forward import completion_logits, policy_token_stats
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

    if phase == "plain":
        logits = completion_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["completion_ids"].flatten(),
                                                reduction="none")
        loss = (nll * batch["completion_mask"].flatten()).sum() / batch["completion_mask"].sum()
        loss.backward()
    elif phase in ("cached", "exact"):  # as ForkGatedTrainer.compute_loss does
        policy = policy_token_stats(model, model, {**batch, "topk_ids": stats["topk_ids"],
                                                   "topk_logp": stats["topk_logp"]}, kl_anchor=phase)
        forks = fork_mask(stats["entropy"], batch["completion_mask"], mode="quantile", quantile=0.2)
        loss, _ = fork_gated_loss(policy.logp, stats["logp"], torch.tensor([1.0]), forks, batch["completion_mask"],
                                  policy.kl, kl_coef=0.2)
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
    ap.add_argument("--length", type=int, default=8192)
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
    plain = results.get("plain")  # --phases may leave it out (at 8192 tokens it needs ~20 GB)
    if "exact" in results:
        ratio = f"exact_ratio={results['exact'] / plain:.3f} " if plain else ""
        print(f"{ratio}exact_logits_multiple={results['exact'] / bxtxv:.3f}")
    if "cached" in results:
        ratio = f"memory_ratio={results['cached'] / plain:.3f} " if plain else ""
        print(f"{ratio}logits_multiple={results['cached'] / bxtxv:.3f}")


if __name__ == "__main__":
    main()

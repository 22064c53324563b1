"""The fused LM head (core.fused_head) against the head + core.logprobs on full logits, on a GPU.

    python bench/head.py                          # bf16, B 4 x C 8192, H 3584, V 152064 (a 7B Qwen head)
    python bench/head.py --batch 1 --length 2048  # smaller

For each KL anchor (cached top-64, exact against base states) it times the forward and
backward of both paths (median of --reps after one warm-up), reads the peak GPU memory
above the start, and gives the fused path's relative difference from the unfused one in
the log-probs, the anchor's output and the hidden-state gradient. The fused path runs at
several chunk sizes. The last line is `fused_time_ratio=<fused / unfused, cached, 64 MB>
fused_memory_multiple=<fused peak / fp32 B x C x V bytes>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.core.fused_head import fused_head_logprobs  # noqa: E402
from reasonmaxxer.core.logprobs import policy_logprobs, policy_logprobs_and_kl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mb", default="16,64,256")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/head.py needs a CUDA GPU")
    B, C, H, V, K = args.batch, args.length, args.hidden, args.vocab, args.top_k
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 2).bfloat16()
    base_hidden = torch.randn(B, C, H, device="cuda", generator=g).bfloat16()
    hidden = (base_hidden.float() + 0.05 * torch.randn(B, C, H, device="cuda", generator=g)).bfloat16()
    targets = torch.randint(0, V, (B, C), device="cuda", generator=g)
    topk_ids = torch.randint(0, V, (B, C, K), device="cuda", generator=g)
    upstream = torch.randn(B, C, device="cuda", generator=g)

    def fused(anchor: str, chunk_bytes: int):
        h = hidden.clone().requires_grad_()
        s = fused_head_logprobs(h, weight, targets, extra_ids=topk_ids if anchor == "cached" else None,
                                base_hidden=base_hidden if anchor == "exact" else None, chunk_bytes=chunk_bytes)
        second = s.extra_logp.sum(-1) if anchor == "cached" else s.kl
        ((s.logp + second) * upstream).sum().backward()
        return s.logp.detach(), second.detach(), h.grad

    def unfused(anchor: str, _chunk_bytes: int):
        h = hidden.clone().requires_grad_()
        logits = torch.nn.functional.linear(h, weight)
        if anchor == "cached":
            logp, topk_logp, _ = policy_logprobs(logits, targets, topk_ids)
            second = topk_logp.sum(-1)
        else:
            with torch.no_grad():
                base_logits = torch.nn.functional.linear(base_hidden, weight)
            logp, _, _, second = policy_logprobs_and_kl(logits, targets, base_logits)
            del base_logits
        ((logp + second) * upstream).sum().backward()
        return logp.detach(), second.detach(), h.grad

    def measure(fn, anchor: str, chunk_bytes: int = 0):
        fn(anchor, chunk_bytes)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(anchor, chunk_bytes)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
        peak = (torch.cuda.max_memory_allocated() - start) / 2**30
        return fn(anchor, chunk_bytes), statistics.median(times), peak

    bxcxv = B * C * V * 4 / 2**30
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} bf16 B={B} C={C} H={H} V={V} K={K} "
          f"(one fp32 B x C x V tensor = {bxcxv:.1f} GiB)", flush=True)
    summary = {}
    for anchor in ("cached", "exact"):
        ref, t_ref, m_ref = measure(unfused, anchor)
        print(f"{anchor:>6} unfused           : {t_ref * 1e3:8.1f} ms  peak +{m_ref:6.2f} GiB "
              f"({m_ref / bxcxv:.2f} x fp32 BxCxV)", flush=True)
        for mb in (int(x) for x in args.chunk_mb.split(",")):
            out, t, m = measure(fused, anchor, mb << 20)
            diff = [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(out, ref)]
            print(f"{anchor:>6} fused, {mb:4d} MB chunks: {t * 1e3:8.1f} ms  peak +{m:6.2f} GiB ({m / bxcxv:.3f} x)  "
                  f"rel. diff logp {diff[0]:.1e}, {'top-k' if anchor == 'cached' else 'kl'} {diff[1]:.1e}, "
                  f"grad_hidden {diff[2]:.1e}", flush=True)
            if anchor == "cached" and mb == 64:
                summary = {"time": t / t_ref, "memory": m / bxcxv}
            del out
        del ref
    if summary:
        print(f"fused_time_ratio={summary['time']:.3f} fused_memory_multiple={summary['memory']:.3f}")


if __name__ == "__main__":
    main()

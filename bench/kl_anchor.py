"""Error of the cached top-k KL anchor against the exact KL, on a trained run.

    python bench/kl_anchor.py --run runs/demo [--rollouts 64]

Takes the run's training rollouts and their cached base top-k log-probs, runs the trained
adapter and the base (adapter disabled) over them, and compares the top-k KL (what
training optimises with `loss.kl_anchor: cached`) with the full-vocabulary KL at non-fork
and fork positions. Prints the relative error of the means; the last line is
`kl_anchor_rel_error_nonfork=<x>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.config.loading import config_from_dict  # noqa: E402
from reasonmaxxer.core.gate import gate_mask  # noqa: E402
from reasonmaxxer.core.kl import exact_kl, topk_kl  # noqa: E402
from reasonmaxxer.core.logprobs import gather_logprobs
from reasonmaxxer.models.forward import completion_hidden, head_logits  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.stages.scoring import load_scores
from reasonmaxxer.utils.sequences import pack_batch, pad_ragged  # noqa: E402
from reasonmaxxer.utils.storage import read_jsonl_cut_torn_tail  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run folder (with config.yaml, scores/, adapter/)")
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from peft import PeftModel

    run = Path(args.run)
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = PeftModel.from_pretrained(load_model(cfg.model.name_or_path, dtype="float32"), str(run / "adapter"))
    model.eval()
    base_model = model.get_base_model()
    rollouts = read_jsonl_cut_torn_tail(run / "rollouts.jsonl")
    scores = load_scores(run / "scores")
    chosen = [r["rollout_index"] for r in read_jsonl_cut_torn_tail(run / "selection.jsonl")][: args.rollouts]
    sums = {"exact_nonfork": 0.0, "topk_nonfork": 0.0, "exact_fork": 0.0, "topk_fork": 0.0}
    counts = {"nonfork": 0, "fork": 0}
    for s in range(0, len(chosen), args.batch):
        idx = chosen[s : s + args.batch]
        batch = pack_batch([rollouts[i]["prompt_ids"] for i in idx], [rollouts[i]["completion_ids"] for i in idx],
                           tokenizer.pad_token_id)
        C = batch["completion_ids"].shape[1]
        with model.disable_adapter():
            base_logits = head_logits(base_model, completion_hidden(base_model, batch))
        policy_logits = head_logits(base_model, completion_hidden(base_model, batch))
        topk_ids = pad_ragged([scores[i]["topk_ids"].long() for i in idx], C)
        topk_logp = pad_ragged([scores[i]["topk_logp"] for i in idx], C)
        entropy = pad_ragged([scores[i]["entropy"] for i in idx], C)
        _, policy_topk = gather_logprobs(policy_logits, batch["completion_ids"], topk_ids)
        exact = exact_kl(base_logits, policy_logits)
        approx = topk_kl(topk_logp, policy_topk)
        mask = batch["completion_mask"].bool()
        forks = gate_mask(cfg.gate, entropy, mask, generator=torch.Generator().manual_seed(cfg.seed))
        for name, sel in (("nonfork", mask & ~forks), ("fork", forks)):
            sums[f"exact_{name}"] += exact[sel].sum().item()
            sums[f"topk_{name}"] += approx[sel].sum().item()
            counts[name] += int(sel.sum())
    print(f"run={run} rollouts={len(chosen)} top_k={cfg.scoring.top_k} positions={counts}")
    for name in ("nonfork", "fork"):
        e = sums[f"exact_{name}"] / max(counts[name], 1)
        a = sums[f"topk_{name}"] / max(counts[name], 1)
        print(f"{name:>8}: exact KL mean {e:.5f}  top-k KL mean {a:.5f}  relative error {(e - a) / e if e else 0:.4%}")
    e = sums["exact_nonfork"] / max(counts["nonfork"], 1)
    a = sums["topk_nonfork"] / max(counts["nonfork"], 1)
    print(f"kl_anchor_rel_error_nonfork={(e - a) / e if e else 0.0:.5f}")


if __name__ == "__main__":
    main()

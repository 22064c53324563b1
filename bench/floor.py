"""Does the push-down floor keep the loss bounded? Training steps on random advantages.

    python bench/floor.py --run runs/demo [--steps 8]

Takes one batch of a run's selected rollouts with their cached scores, replaces the
advantages with random signs (so every fork is pushed somewhere), gates every completion
token (all forks: the contrastive term alone) and takes AdamW steps on that same batch,
twice from a fresh adapter: with
`loss.neg_prob_floor: 0` (the paper's form) and with the configured floor. Prints the
loss per step; the paper's form keeps falling, the floored one stays above
-max|A| * ln(1 / floor). The last line is `final_loss_no_floor=<x> final_loss_floor=<y>`.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonmaxxer.config.loading import config_from_dict  # noqa: E402
from reasonmaxxer.models.loading import load_model, load_tokenizer  # noqa: E402
from reasonmaxxer.stages.scoring import load_scores  # noqa: E402
from reasonmaxxer.training.trainer import build_trainer  # noqa: E402
from reasonmaxxer.utils.storage import read_jsonl_cut_torn_tail  # noqa: E402


def losses(run: Path, floor: float, steps: int, batch: int, lr: float) -> list[float]:
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg.loss.neg_prob_floor = floor
    cfg.loss.kl_coef = 0.0
    cfg.gate.mode = "all"
    cfg.training.update({"learning_rate": lr, "per_device_train_batch_size": batch, "max_steps": steps,
                         "logging_steps": 1, "save_strategy": "no", "lr_scheduler_type": "constant"})
    cfg.training.pop("save_steps", None)
    rng = random.Random(0)
    fixed = [{**r, "advantage": rng.choice([-2.5, 2.5])} for r in read_jsonl_cut_torn_tail(run / "selection.jsonl")]
    # The same batch at every step (shuffling off), as in the runaway the paper's form shows.
    selection = fixed[:batch] * steps
    cfg.training["data_seed"] = 0
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, dtype="float32")
    torch.manual_seed(0)
    trainer = build_trainer(cfg, model, tokenizer, read_jsonl_cut_torn_tail(run / "rollouts.jsonl"), selection,
                            load_scores(run / "scores"), Path(tempfile.mkdtemp()), entropy_temperature=0.6)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--floor", type=float, default=0.05)
    args = ap.parse_args()
    run = Path(args.run)
    free = losses(run, 0.0, args.steps, args.batch, args.lr)
    floored = losses(run, args.floor, args.steps, args.batch, args.lr)
    bound = -2.5 * math.log(1 / args.floor)
    print(f"run={run} steps={args.steps} batch={args.batch} lr={args.lr} advantages=+-2.5 (random) gate=all")
    print(f"{'step':>4} {'floor=0':>10} {f'floor={args.floor}':>12}")
    for i, (a, b) in enumerate(zip(free, floored), 1):
        print(f"{i:>4} {a:>10.3f} {b:>12.3f}")
    print(f"lower bound with the floor: {bound:.3f}")
    print(f"final_loss_no_floor={free[-1]:.3f} final_loss_floor={floored[-1]:.3f}")


if __name__ == "__main__":
    main()

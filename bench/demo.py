"""The embedded demo in float32 and in the default dtype, back to back, per stage.

    python bench/demo.py                        # both arms, then eval.py on each
    python bench/demo.py --no-eval              # training only
    python bench/demo.py --arms auto float32    # another order (the first arm warms the disk cache)
    python bench/demo.py --arms float32:rollout.batch_size=32 auto   # the fp32 arm with its own override

Each arm is ``python train.py --config configs/demo.yaml --model.dtype D`` in a fresh
output folder (same seed, so the same problems; the same number of rollouts and steps),
run as its own process one after the other on the same machine. Printed per arm: wall
seconds of the whole command, each stage's seconds, and the outcome (mean rollout reward,
share of completion tokens above tau, the training's last loss; with eval, pass@1 of base
and adapter and the fork/non-fork KL ratio). The last line is the paired ratio of the
second arm's wall time to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("problems", "rollouts", "scoring", "selection", "training")


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def run_arm(arm: str, out: Path, *, evaluate: bool, extra: list[str]) -> dict:
    """One arm: ``DTYPE`` or ``DTYPE:key=value,key=value`` (config overrides of this arm only)."""
    dtype, _, spec = arm.partition(":")
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv]
    if any(len(kv) != 2 for kv in pairs):
        sys.exit(f"--arms: '{arm}' is not DTYPE or DTYPE:key=value,key=value")
    own = [x for key, value in pairs for x in (f"--{key}", value)]
    common = ["--config", "configs/demo.yaml", "--model.dtype", dtype, "--no-progress", *own, *extra]
    row: dict = {"dtype": arm, "train_wall": _run([sys.executable, "train.py", *common, "--output_dir", str(out)])}
    for stage in STAGES:
        state = json.loads((out / "stages" / f"{stage}.json").read_text())
        row[stage] = state["seconds"]
        row[f"{stage}_summary"] = state["summary"]
    log = json.loads((out / "train_log.json").read_text())
    row["last_loss"] = next(h["loss"] for h in reversed(log) if "loss" in h)
    if evaluate:
        row["eval_wall"] = _run([sys.executable, "eval.py", *common, "--run_dir", str(out)])
        movement = json.loads((out / "movement.json").read_text())
        accuracy = json.loads((out / "accuracy.json").read_text())
        row["kl_ratio"] = movement["kl_ratio"]
        row["pass_base"] = accuracy["base"]["pass_at_1"]
        row["pass_adapter"] = accuracy["adapter"]["pass_at_1"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["float32", "auto"],
                    help="each arm's model.dtype, in order, optionally with its own overrides: "
                         "float32:rollout.batch_size=32")
    ap.add_argument("--no-eval", action="store_true", help="skip eval.py")
    ap.add_argument("--out", help="folder for the runs (default: a temporary one)")
    args, extra = ap.parse_known_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="demo-bench-"))
    rows = [run_arm(a, root / f"demo-{i}-{a.partition(':')[0]}", evaluate=not args.no_eval, extra=extra)
            for i, a in enumerate(args.arms)]
    print(f"runs in {root}; cpu_count={os.cpu_count()}")
    head = ["arm", "train.py s", *[f"{s} s" for s in STAGES], "mean reward", "share > tau", "last loss"]
    if not args.no_eval:
        head += ["eval.py s", "pass@1 base", "pass@1 adapter", "KL ratio fork/non-fork"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["dtype"], f"{r['train_wall']:.0f}", *[f"{r[s]:.1f}" for s in STAGES],
                 f"{r['rollouts_summary']['mean_reward']:.3f}", f"{r['scoring_summary']['share_above_tau']:.3f}",
                 f"{r['last_loss']:.3f}"]
        if not args.no_eval:
            cells += [f"{r['eval_wall']:.0f}", f"{r['pass_base']:.3f}", f"{r['pass_adapter']:.3f}",
                      f"{r['kl_ratio']:.2f}" if r["kl_ratio"] is not None else "–"]
        print("| " + " | ".join(cells) + " |")
    first, last = rows[0], rows[-1]
    ratios = {f"{s}_ratio": last[s] / first[s] for s in ("rollouts", "scoring", "training") if first[s] > 0}
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items())
          + f" train_wall_ratio={last['train_wall'] / first['train_wall']:.3f}"
          + (f" eval_wall_ratio={last['eval_wall'] / first['eval_wall']:.3f}" if not args.no_eval else ""))


if __name__ == "__main__":
    main()

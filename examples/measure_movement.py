"""How far did a fine-tune move from its base, at the base's forks and elsewhere?

    python examples/measure_movement.py --base BASE --model ADAPTER_OR_MODEL --data rollouts.jsonl

``--model`` is a PEFT adapter folder (its base pass runs with the adapter disabled) or a
full model folder (an RL checkpoint, a merged model). ``--data`` is a JSONL file of
``{"prompt": ..., "completion": ..., "reward": ...}`` rows (text, or lists of chat
messages), e.g. base-model samples on held-out problems.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import reasonmaxxer as rm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--base", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--tau", type=float, default=1.4, help="fork threshold on the base entropy, nats")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.base)
base = AutoModelForCausalLM.from_pretrained(args.base)
if (Path(args.model) / "adapter_config.json").exists():
    from peft import PeftModel

    model, base_model = PeftModel.from_pretrained(base, args.model), None
else:
    model, base_model = AutoModelForCausalLM.from_pretrained(args.model), base
rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]

report = rm.movement(model, tokenizer, rows, base_model=base_model, tau=args.tau)
fork, rest = report["fork"], report["nonfork"]


def f(x):  # a statistic of an empty set (no fork, or nothing else) is None
    return "–" if x is None else f"{x:.4f}"



print(f"{report['rollouts']} rollouts, {report['positions']['fork']} fork and {report['positions']['nonfork']} "
      f"other positions (base entropy > {args.tau} nats)")
print(f"mean KL(base || model): {f(fork['kl_mean'])} at forks, {f(rest['kl_mean'])} elsewhere "
      f"(ratio {f(report['kl_ratio'])})")
print(f"top-1 agreement: {f(fork['top1_agreement'])} at forks, {f(rest['top1_agreement'])} elsewhere")
print(f"share of the KL mass at forks: {f(report['kl_share_at_forks'])}")

"""The adapter's model card (``<output_dir>/adapter/README.md``) and its upload to the Hub.

The card is written from the run folder alone: the config, the stages' summaries
(``stages/*.json``), the Trainer's log (``train_log.json``) and, once eval.py has run, its
``accuracy.json``/``movement.json``. Training writes it; eval rewrites it with the results.
Its YAML front matter (``base_model``, ``library_name: peft``, ``tags``) is what the Hub
reads to list the adapter under its base model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..models.loading import SMOLLM2
from ..utils.storage import atomic_write_text, read_json

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the embedded default was quantised from (its weights here are the Q4_1 GGUF's)."""

METHOD = (
    "Fork-gated LoRA fine-tuning (ReasonMaxxer). The base model sampled several completions per problem; each "
    "was scored for correctness and teacher-forced once through the base to measure the entropy of every "
    "completion token. Training pushes gradient only through the high-entropy tokens, the *forks* where the "
    "model hesitated between continuations: a correct rollout's fork tokens are made more likely and a wrong "
    "one's less likely, weighted by the rollout's group-normalised advantage. Every other completion token is "
    "held near the base by a KL(base || policy) penalty, so the adapter changes the model at its decisions and "
    "leaves the rest of its text as it was."
)


def base_model_hub_id(name_or_path: str) -> str | None:
    """The Hub id of a base model spec, or None for a local folder whose origin is unknown.

    The embedded default maps to the model it came from; a folder of the Hugging Face
    cache (``.../models--org--name/snapshots/<rev>``) to ``org/name``.
    """
    if name_or_path == SMOLLM2:
        return SMOLLM2_HUB_ID
    path = Path(name_or_path).expanduser()
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None if path.exists() else name_or_path


def run_name(cfg: Config) -> str:
    """The run's name: ``tracking.run_name``, else the output folder's name."""
    return cfg.tracking.run_name or Path(cfg.output_dir).resolve().name


def hub_repo_id(cfg: Config) -> str:
    """Where ``training.push_to_hub`` uploads: ``training.hub_model_id``, else the run's name.

    A run name becomes a valid Hub repo name (letters, digits, ``-_.``, at most 96
    characters): a sweep point's folder name holds ``=`` and ``,``.
    """
    if cfg.training.get("hub_model_id"):
        return cfg.training["hub_model_id"]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name(cfg)).strip("-.")[:96].rstrip("-.")
    return name or "reasonmaxxer-adapter"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / "stages" / f"{stage}.json"
    if not path.is_file():
        return {}
    state = read_json(path)
    return (state.get("summary") or {}) if state.get("done") else {}


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def front_matter(cfg: Config) -> dict[str, Any]:
    """The card's YAML metadata, in the keys the Hub understands."""
    base = base_model_hub_id(cfg.model.name_or_path)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["reasonmaxxer", "lora", "peft", "fork-gated", f"gate-{cfg.gate.mode}", f"loss-{cfg.loss.variant}",
                    *([f"base_model:adapter:{base}"] if base else [])]
    if cfg.data.source == "hf" and cfg.data.name:
        meta["datasets"] = [cfg.data.name]
    return meta


def _settings_lines(cfg: Config) -> list[str]:
    gate = cfg.gate.effective()
    gate_text = ", ".join(f"{k}: {_fmt(v)}" for k, v in gate.items())
    loss = cfg.loss
    anchor = f"{loss.kl_anchor} (base top-{cfg.scoring.top_k} from scoring)" if loss.kl_anchor == "cached" else \
        f"{loss.kl_anchor} (adapter-disabled forward)"
    extra = {"hinge": f", hinge margin {_fmt(loss.hinge_margin)} nats"}.get(loss.variant, "")
    if loss.variant in ("signed", "split"):
        extra = f", negative-fork probability floor {_fmt(loss.neg_prob_floor)}"
    lora = cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    return [
        "| setting | value |",
        "|---|---|",
        f"| gate | {gate_text} |",
        f"| entropy measured at temperature | {_fmt(cfg.entropy_temperature)} |",
        f"| loss | {loss.variant}{extra} |",
        f"| KL anchor | coefficient {_fmt(loss.kl_coef)}, {anchor} |",
        f"| LoRA | r {lora.r}, alpha {lora.alpha}, dropout {_fmt(lora.dropout)}, target modules {targets} |",
        f"| rollouts | {cfg.rollout.num_samples} per problem, temperature {_fmt(cfg.rollout.temperature)}, "
        f"top-p {_fmt(cfg.rollout.top_p)}, at most {cfg.rollout.max_new_tokens} new tokens |",
    ]


def _data_lines(cfg: Config, run_dir: Path) -> list[str]:
    d = cfg.data
    source = {
        "builtin": f"built-in arithmetic problems, kinds {', '.join(d.kinds)}",
        "hf": f"Hugging Face dataset `{d.name}`" + (f" ({d.config_name})" if d.config_name else "")
        + f", split `{d.split}`",
        "file": f"local file `{Path(d.path or '').name}`",
    }[d.source]
    problems = _summary(run_dir, "problems")
    rollouts = _summary(run_dir, "rollouts")
    selection = _summary(run_dir, "selection")
    lines = [f"- Source: {source}.",
             f"- Problems: {problems.get('train', d.num_train)} for training, "
             f"{problems.get('heldout', d.num_heldout)} held out for evaluation."]
    if rollouts:
        lines.append(f"- Rollouts: {rollouts.get('rollouts')} sampled from the base, mean reward "
                     f"{_fmt(rollouts.get('mean_reward'))}.")
    if selection:
        lines.append(
            f"- Selection: {selection.get('problems_kept')} of {selection.get('problems_total')} problems kept "
            f"(mixed success: {selection.get('problems_mixed')}), {selection.get('rollouts_kept')} rollouts "
            f"({selection.get('positive')} positive, {selection.get('negative')} negative advantage)."
        )
    return lines


def _training_lines(cfg: Config, run_dir: Path) -> list[str]:
    log = _read(run_dir / "train_log.json") or []
    steps = [h for h in log if "loss" in h and "step" in h]
    final = next((h for h in reversed(log) if "train_loss" in h), {})
    t = cfg.training
    lines = [f"- Learning rate {_fmt(t.get('learning_rate'))} ({t.get('lr_scheduler_type')}), batch size "
             f"{t.get('per_device_train_batch_size')} per device x {t.get('gradient_accumulation_steps')} "
             f"accumulation steps, seed {cfg.seed}."]
    if not log:
        return lines + ["- Not trained yet."]
    last = steps[-1] if steps else {}
    lines.append(f"- Steps: {final.get('step', last.get('step'))}; final logged loss {_fmt(last.get('loss'))}, "
                 f"mean training loss {_fmt(final.get('train_loss'))}.")
    if "fork_fraction" in last:
        lines.append(f"- Last step: fork fraction {_fmt(last['fork_fraction'])}, fork term "
                     f"{_fmt(last.get('fork_term'))}, KL term {_fmt(last.get('kl_term'))}.")
    return lines


def _evaluated_this_adapter(eval_dir: Path, adapter_weights: Path) -> bool:
    """Whether eval.py's results are newer than the adapter (a retrained adapter has none yet)."""
    results = [eval_dir / name for name in ("accuracy.json", "movement.json") if (eval_dir / name).is_file()]
    if not results:
        return False
    return not adapter_weights.is_file() or min(p.stat().st_mtime for p in results) >= adapter_weights.stat().st_mtime


def _evaluation_lines(eval_dir: Path, adapter_weights: Path) -> list[str]:
    if not _evaluated_this_adapter(eval_dir, adapter_weights):
        return ["Not evaluated yet: `python eval.py --config FILE` adds the results here."]
    accuracy = _read(eval_dir / "accuracy.json")
    movement = _read(eval_dir / "movement.json")
    lines = []
    if accuracy is not None:
        base, adapter, delta = accuracy["base"], accuracy["adapter"], accuracy["delta_pass_at_1"]
        k = base.get("samples_per_problem")
        lines += [
            f"Held-out problems, {k} samples each (base vs adapter, same seeds):",
            "",
            "| metric | base | adapter |",
            "|---|---|---|",
            f"| pass@1 | {_fmt(base.get('pass_at_1'))} | {_fmt(adapter.get('pass_at_1'))} |",
            f"| pass@{k} | {_fmt(base.get(f'pass_at_{k}'))} | {_fmt(adapter.get(f'pass_at_{k}'))} |",
            f"| greedy accuracy | {_fmt(base.get('greedy_accuracy'))} | {_fmt(adapter.get('greedy_accuracy'))} |",
            "",
            f"Delta pass@1: {_fmt(delta.get('mean'))} (95% bootstrap CI {_fmt(delta['ci95'][0])} to "
            f"{_fmt(delta['ci95'][1])}, {delta.get('n')} problems).",
        ]
    if movement is not None:
        fork, nonfork = movement.get("fork") or {}, movement.get("nonfork") or {}
        lines += [
            "",
            f"Movement on {movement.get('rollouts')} held-out base rollouts: mean KL(base || adapter) "
            f"{_fmt(fork.get('kl_mean'))} at forks vs {_fmt(nonfork.get('kl_mean'))} elsewhere (ratio "
            f"{_fmt(movement.get('kl_ratio'))}); {_fmt(movement.get('kl_share_at_forks'))} of the KL sits at the "
            f"{_fmt(movement.get('fork_share_of_positions'))} of positions that are forks.",
        ]
    return lines


def model_card(cfg: Config, run_dir: Path, eval_dir: Path | None = None) -> str:
    """The card's text (front matter and markdown) from what ``run_dir`` holds."""
    base = base_model_hub_id(cfg.model.name_or_path)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.model.name_or_path}` (a local model)"
    if cfg.model.name_or_path == SMOLLM2:
        base_text += " (trained against the weights of its Q4_1 GGUF, dequantised)"
    repo = hub_repo_id(cfg)
    load_base = base or cfg.model.name_or_path
    sections = [
        "---\n" + yaml.safe_dump(front_matter(cfg), sort_keys=False) + "---",
        f"# {run_name(cfg)}",
        f"A LoRA adapter for {base_text}, trained with ReasonMaxxer.",
        "## Method\n\n" + METHOD,
        "## Settings\n\n" + "\n".join(_settings_lines(cfg)),
        "## Data\n\n" + "\n".join(_data_lines(cfg, run_dir)),
        "## Training\n\n" + "\n".join(_training_lines(cfg, run_dir)),
        "## Evaluation\n\n" + "\n".join(
            _evaluation_lines(eval_dir or run_dir, run_dir / "adapter" / "adapter_model.safetensors")),
        "## Usage\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
        f"AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained(\"{load_base}\")\n"
        f"model = PeftModel.from_pretrained(base, \"{repo}\")  # or the adapter folder\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{load_base}\")\n```\n\n"
        "`python train.py --config FILE --merge` writes the base with this adapter merged in "
        "(`<output_dir>/merged/`), loadable without PEFT.",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(cfg: Config, run_dir: Path, eval_dir: Path | None = None) -> Path:
    """(Re)write ``run_dir/adapter/README.md``; evaluation results are read from ``eval_dir`` (default run_dir)."""
    path = run_dir / "adapter" / "README.md"
    atomic_write_text(path, model_card(cfg, run_dir, eval_dir))
    return path


def push_adapter(cfg: Config, run_dir: Path) -> str | None:
    """Upload ``run_dir/adapter`` (weights, tokenizer, card) to the Hub repo :func:`hub_repo_id` names.

    Returns the repo id, or None when the upload failed: the adapter stays saved locally and
    the warning says how to upload it by hand, so a network failure does not undo a training run.
    """
    from huggingface_hub import HfApi

    t = cfg.training
    api = HfApi(token=t.get("hub_token"))
    folder = run_dir / "adapter"
    try:
        repo = api.create_repo(hub_repo_id(cfg), private=t.get("hub_private_repo"), exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"ReasonMaxxer run {run_name(cfg)}")
    except Exception as err:  # any hub or network failure: keep the trained adapter
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logger.warning("training.push_to_hub: uploading %s to '%s' failed: %s; upload it later with "
                       "`hf upload %s %s`", folder, hub_repo_id(cfg), first, hub_repo_id(cfg), folder)
        return None
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo)
    return repo

"""Head-to-head on equal compute: ``train.py --compare FILE``.

A compare file lists ARMS (config overrides on top of one base config, like sweep
points) and SEEDS, one compute BUDGET in FLOPs and the CHECKPOINTS (fractions of the
budget) at which each arm is evaluated. Every arm gets the same LoRA, problems, verifier,
sampling temperature and evaluation (overrides of those are refused).

- An offline arm (``method`` offline, the default) spends more compute the way a user
  would: scale s multiplies ``data.num_train`` and ``training.max_steps``; each scale is
  its own run (problems -> selection shared by the offline arms of a seed and scale), and
  its total compute is one point of the arm's curve. The scales are the checkpoint
  fractions times the scale whose estimated compute is the budget (``offline_scales``
  sets them instead).
- Any other arm (``method: grpo`` / ``online``) is one run per seed whose
  ``training.max_steps`` is the budget over its estimated compute per step; it writes
  ``compute.json`` (cumulative per checkpoint), and the checkpoint nearest each fraction
  of the budget is evaluated.

Every point is evaluated on the seed's held-out problems (the base's samples drawn once
per seed and shared) and its movement measured on the same base rollouts at the same
forks. Results go to ``<output_dir>/compare/<name>/``; a finished point is never redone, and
one made with other settings (its run's training, the evaluation, the budget) stops the
compare with an error instead of being reused.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from pathlib import Path
from typing import Any

from ..config import Config, load_config, read_yaml
from ..errors import ConfigError, UserError
from ..utils.lock import hold_folder
from ..utils.storage import atomic_write_json, fingerprint, read_json
from .shared import link_shared_stages, run_shared_stages
from .sweep import point_args

logger = logging.getLogger(__name__)

COMPARE_KEYS = ("name", "config", "overrides", "seeds", "budget", "checkpoints", "arms", "offline_scales",
                "reference", "tokens_per_sample", "n_params")
OFFLINE = "offline"
FAIR_SECTIONS = ("model", "data", "reward", "lora", "eval")
"""Arms may not override these sections: every arm trains the same LoRA on the same problems and verifier."""
FAIR_KEYS = ("seed", "output_dir", "scoring.entropy_temperature", "training.max_steps", "training.num_train_epochs",
             "training.save_steps", "training.save_strategy", "training.save_total_limit")
FAIR_LEAVES = ("temperature", "top_p", "max_new_tokens", "max_completion_length")
"""Sampling settings (in any section: rollout, an RL method's own): every arm samples alike."""

# Seconds per sample on 2 CPU cores for SmolLM2-135M at about 100 tokens per sample, measured:
# the demo (rollouts 269 s for 384 samples, scoring 150 s, training 257 s for 40 steps of 8) and
# the demo comparison (per sample of an RL step, generation and update together: grpo 685 s for
# 224 samples, grpo-80-20 571 s for 224, online 547 s for 176; one evaluation of 96 samples and
# the movement pass on 32 base rollouts about 80 s). Scaled by N / 135M and by tokens / 100.
DEMO_N = 134_515_008
DEMO_SECONDS_PER_SAMPLE = {"rollout": 269 / 384, "scoring": 150 / 384, "training": 257 / 320,
                           "grpo": (685 + 571) / 448, "online": 547 / 176, "eval": 0.7, "movement": 0.4}
DEMO_TOKENS_PER_SAMPLE = 100


@dataclasses.dataclass
class Arm:
    name: str
    overrides: dict[str, Any]


@dataclasses.dataclass
class CompareSpec:
    path: Path
    name: str
    config: str | None
    overrides: dict[str, Any]
    seeds: list[int]
    budget: float
    checkpoints: list[float]
    arms: list[Arm]
    offline_scales: list[float] | None
    reference: str
    tokens_per_sample: int | None
    n_params: int | None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{gate: {mode: all}}`` -> ``{"gate.mode": "all"}``; a section's own mapping values (e.g.
    ``training.lr_scheduler_kwargs``) stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(where: str, key: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"{where}: {key}: expected a number, got {value!r}") from None
    if positive and not (x > 0 and math.isfinite(x)):
        raise ConfigError(f"{where}: {key}: must be > 0, got {value!r}")
    return x


def load_compare(path: str | Path) -> CompareSpec:
    """Read and check a compare file's structure (the configs are checked by :func:`arm_configs`)."""
    p = Path(path)
    raw = read_yaml(p)
    where = f"compare file '{p}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with 'budget', 'seeds' and 'arms'")
    for key in raw:
        if key not in COMPARE_KEYS:
            close = difflib.get_close_matches(str(key), COMPARE_KEYS, n=1)
            raise ConfigError(f"{where}: {key}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                                               f"; keys are {', '.join(COMPARE_KEYS)}"))
    for key in ("budget", "arms"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: missing")
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{where}: config: expected a path to a YAML config, got {config!r}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping of config keys, got {overrides!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds: a seed is listed twice ({seeds!r})")
    budget = _number(where, "budget", raw["budget"])
    checkpoints = _fractions(where, "checkpoints", raw.get("checkpoints", 3))
    scales = raw.get("offline_scales")
    if scales is not None:
        if not isinstance(scales, list) or not scales:
            raise ConfigError(f"{where}: offline_scales: expected a non-empty list of numbers, got {scales!r}")
        scales = sorted(_number(where, "offline_scales", s) for s in scales)
    arms = _arms(where, raw["arms"])
    reference = raw.get("reference")
    if reference is None:
        reference = next((a.name for a in arms if a.overrides.get("method", OFFLINE) == OFFLINE), arms[0].name)
    elif reference not in [a.name for a in arms]:
        raise ConfigError(f"{where}: reference: {reference!r} is not an arm ({', '.join(a.name for a in arms)})")
    tokens = raw.get("tokens_per_sample")
    n_params = raw.get("n_params")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw.get("name") or p.stem))
    return CompareSpec(path=p, name=name, config=config, overrides=_flatten(overrides), seeds=list(seeds),
                       budget=budget, checkpoints=checkpoints, arms=arms, offline_scales=scales,
                       reference=reference, tokens_per_sample=int(_number(where, "tokens_per_sample", tokens))
                       if tokens is not None else None,
                       n_params=int(_number(where, "n_params", n_params)) if n_params is not None else None)


def _fractions(where: str, key: str, value: Any) -> list[float]:
    """``n`` (the fractions 1/n .. 1) or a list of fractions of the budget in (0, 1]."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: {key}: must be >= 1, got {value}")
        return [(i + 1) / value for i in range(value)]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {key}: expected a count or a list of fractions of the budget, got {value!r}")
    out = sorted(_number(where, key, v) for v in value)
    if out[-1] > 1:
        raise ConfigError(f"{where}: {key}: fractions of the budget must be in (0, 1], got {out[-1]}")
    return out


def _arms(where: str, raw: Any) -> list[Arm]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: arms: expected a non-empty list of {{name, overrides}}")
    arms = []
    for i, a in enumerate(raw):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"]:
            raise ConfigError(f"{where}: arms[{i}]: expected a mapping with a 'name' and 'overrides'")
        extra = set(a) - {"name", "overrides"}
        if extra:
            raise ConfigError(f"{where}: arms[{i}] ({a['name']}): unknown key '{sorted(extra)[0]}' "
                              "(an arm has name and overrides)")
        if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", a["name"]):
            raise ConfigError(f"{where}: arms[{i}]: name {a['name']!r} must be letters, digits and _ . + = -")
        if a["name"] in [b.name for b in arms]:
            raise ConfigError(f"{where}: arms[{i}]: name {a['name']!r} is used twice")
        overrides = a.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: arms[{i}] ({a['name']}): overrides: expected a mapping of config keys")
        flat = _flatten(overrides)
        for key in flat:
            if _unfair(key):
                raise ConfigError(
                    f"{where}: arms[{i}] ({a['name']}): {key}: arms must share the model, LoRA, problems, verifier, "
                    "sampling and evaluation, and the budget sets the steps; set it in 'overrides' for every arm")
        arms.append(Arm(a["name"], flat))
    return arms


def _unfair(key: str) -> bool:
    return (key.split(".")[0] in FAIR_SECTIONS or key in FAIR_KEYS or key.split(".")[-1] in FAIR_LEAVES)


# ----------------------------------------------------------------------------- configs


def method_of(cfg: Config) -> str:
    """The arm's training method (the key may not exist in this schema: then offline)."""
    return str(getattr(cfg, "method", OFFLINE))


def compare_dir(spec: CompareSpec, base: Config) -> Path:
    return Path(base.output_dir) / "compare" / spec.name


def _load(spec: CompareSpec, cli_overrides: list[str], *dicts: dict[str, Any]) -> Config:
    merged: dict[str, Any] = {}
    for d in (spec.overrides, *dicts):
        merged.update(d)
    try:
        return load_config(spec.config, [*cli_overrides, *point_args(merged)])
    except ConfigError as err:
        raise ConfigError(f"compare file '{spec.path}': {err}") from None


def base_config(spec: CompareSpec, cli_overrides: list[str], seed: int | None = None) -> Config:
    return _load(spec, cli_overrides, {} if seed is None else {"seed": seed})


def eval_config(spec: CompareSpec, cli_overrides: list[str], seed: int) -> Config:
    """The config every point of a seed is evaluated with: the base's problems, eval and the gate at T 1."""
    cfg = _load(spec, cli_overrides, {"seed": seed, "scoring.entropy_temperature": 1.0})
    cfg.output_dir = str(compare_dir(spec, base_config(spec, cli_overrides)) / "seeds" / f"seed={seed}")
    return cfg


def scaled(cfg_num_train: int, max_steps: int, scale: float) -> dict[str, Any]:
    """Scale s: s times the problems and s times the steps (at least one of each)."""
    return {"data.num_train": max(1, round(cfg_num_train * scale)), "training.max_steps": max(1, round(max_steps * scale))}


def tokens_per_sample(spec: CompareSpec, cfg: Config) -> int:
    """Estimated prompt + completion tokens per sample (``tokens_per_sample``, else max_new_tokens + 64)."""
    return spec.tokens_per_sample or cfg.rollout.max_new_tokens + 64


def samples_per_step(cfg: Config) -> int:
    t = cfg.training
    return int(t.get("per_device_train_batch_size", 8)) * int(t.get("gradient_accumulation_steps", 1))


def offline_flops_estimate(cfg: Config, n_params: int, tokens: int) -> float:
    """Rollouts + scoring (2N per token each) + training (6N per trained token, + 2N per exact-KL reference pass)."""
    samples = cfg.data.num_train * cfg.rollout.num_samples
    trained = int(cfg.training.get("max_steps", 0)) * samples_per_step(cfg) * tokens
    reference = int(cfg.loss.kl_anchor == "exact") + int(cfg.loss.kl_on_prompt)
    return float(n_params) * (2 * 2 * samples * tokens + 6 * trained + 2 * reference * trained)


def rl_step_flops_estimate(cfg: Config, n_params: int, tokens: int) -> float:
    """One optimizer step of an RL arm: its samples generated (2N), trained (6N), scored again for
    ``online`` (2N), with a reference forward when its KL coefficient ``grpo.beta`` is > 0 (2N)."""
    d = cfg.to_dict()
    beta = float((d.get("grpo") or {}).get("beta", 0.0) or 0.0)
    per_token = 2 + 6 + (2 if method_of(cfg) == "online" else 0) + (2 if beta > 0 else 0)
    return float(n_params) * per_token * samples_per_step(cfg) * tokens


def parameter_count(spec: CompareSpec, cfg: Config) -> int:
    """N: ``n_params`` from the file, else counted from the model's config on the meta device (no weights)."""
    if spec.n_params:
        return spec.n_params
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import resolve_model_path

    try:
        path = resolve_model_path(cfg.model.name_or_path)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"compare file '{spec.path}': n_params: cannot read the model's config to count its "
                          f"parameters ({str(err).splitlines()[0][:160]}); give n_params in the file") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class ArmRun:
    """One arm at one seed: its runs (offline: one per scale) and their configs."""

    arm: Arm
    seed: int
    method: str
    runs: list[tuple[str, float | None, Config]]  # (label, scale or None, config)


def plan_runs(spec: CompareSpec, cli_overrides: list[str], n_params: int) -> list[ArmRun]:
    """Every arm x seed with its run configs; each config is loaded (validated) here, before any work."""
    base = base_config(spec, cli_overrides)
    root = compare_dir(spec, base)
    tokens = tokens_per_sample(spec, base)
    if base.data.source != "builtin" and base.data.heldout_split is None and base.data.heldout_path is None:
        raise ConfigError(f"compare file '{spec.path}': data.heldout_split or data.heldout_path is needed: the "
                          "offline scales change data.num_train, which would change a split of one source")
    out = []
    for seed in spec.seeds:
        for arm in spec.arms:
            cfg = _load(spec, cli_overrides, arm.overrides, {"seed": seed})
            method = method_of(cfg)
            runs = []
            if method == OFFLINE:
                for scale in offline_scales(spec, cfg, n_params, tokens):
                    label = f"scale={scale:g}"
                    run = _load(spec, cli_overrides, arm.overrides, {"seed": seed},
                                scaled(cfg.data.num_train, int(cfg.training.get("max_steps", 1)), scale))
                    run.output_dir = str(root / "runs" / arm.name / f"seed={seed}" / label)
                    runs.append((label, scale, run))
            else:
                steps = max(1, math.ceil(spec.budget / rl_step_flops_estimate(cfg, n_params, tokens)))
                save = max(1, steps // (2 * len(spec.checkpoints)))
                # every checkpoint kept (the default keeps the last 2): the points are the ones nearest
                # each fraction of the budget, early ones included
                run = _load(spec, cli_overrides, arm.overrides, {"seed": seed, "training.max_steps": steps,
                                                                 "training.save_steps": save,
                                                                 "training.save_total_limit": None})
                run.output_dir = str(root / "runs" / arm.name / f"seed={seed}")
                runs.append(("run", None, run))
            out.append(ArmRun(arm, seed, method, runs))
    return out


def offline_scales(spec: CompareSpec, cfg: Config, n_params: int, tokens: int) -> list[float]:
    """``offline_scales``, else the checkpoint fractions times the scale whose estimate is the budget."""
    if spec.offline_scales:
        return spec.offline_scales
    full = spec.budget / offline_flops_estimate(cfg, n_params, tokens)
    return [round(f * full, 3) for f in spec.checkpoints]


# ----------------------------------------------------------------------------- plan


def _seconds_estimate(spec: CompareSpec, runs: list[ArmRun], n_params: int, tokens: int) -> dict[str, float]:
    """From the demo's 2-CPU-core timings, scaled by N and by tokens per sample (a GPU is far faster)."""
    size = n_params / DEMO_N * tokens / DEMO_TOKENS_PER_SAMPLE
    rate = {k: v * size for k, v in DEMO_SECONDS_PER_SAMPLE.items()}
    out = {"shared stages": 0.0, "training": 0.0, "eval": 0.0}
    shared_seen = set()
    base = base_config(spec, [])
    eval_problems = min(base.data.num_heldout, base.eval.max_problems or base.data.num_heldout)
    # one evaluated point: the adapter's samples, and the movement pass (both models) on the base rollouts
    one_eval = (eval_problems * base.eval.num_samples * (1 + base.eval.greedy) * rate["eval"]
                + base.eval.movement_rollouts * rate["movement"])
    for ar in runs:
        for label, scale, cfg in ar.runs:
            if ar.method == OFFLINE:
                samples = cfg.data.num_train * cfg.rollout.num_samples
                if (ar.seed, scale) not in shared_seen:
                    shared_seen.add((ar.seed, scale))
                    out["shared stages"] += samples * (rate["rollout"] + rate["scoring"])
                out["training"] += int(cfg.training["max_steps"]) * samples_per_step(cfg) * rate["training"]
                out["eval"] += one_eval
            else:
                rl_rate = rate["online"] if ar.method == "online" else rate["grpo"]
                out["training"] += int(cfg.training["max_steps"]) * samples_per_step(cfg) * rl_rate
                out["eval"] += len(spec.checkpoints) * one_eval
    # the base's samples and its movement rollouts, once per seed
    out["eval"] += len(spec.seeds) * (one_eval + base.eval.movement_rollouts * rate["eval"])
    return out


def compare_plan(config_path: str | None, cli_overrides: list[str], compare_path: str) -> str:
    """What ``--compare`` would do, without doing it."""
    spec = load_compare(compare_path)
    spec.config = spec.config or config_path
    base = base_config(spec, cli_overrides)
    n_params = parameter_count(spec, base)
    tokens = tokens_per_sample(spec, base)
    runs = plan_runs(spec, cli_overrides, n_params)
    root = compare_dir(spec, base)
    lines = [f"compare {spec.name}: {len(spec.arms)} arms x {len(spec.seeds)} seed(s) {spec.seeds}, budget "
             f"{spec.budget:.3g} FLOPs per arm, evaluated at {', '.join(f'{f:g}' for f in spec.checkpoints)} of it; "
             f"reference arm {spec.reference}",
             f"  N = {n_params / 1e6:.1f}M parameters, ~{tokens} tokens per sample (estimate), results in {root}/"]
    for ar in runs:
        if ar.seed != spec.seeds[0]:
            continue
        if ar.method == OFFLINE:
            parts = [f"{label} (data.num_train {c.data.num_train}, training.max_steps {c.training['max_steps']}, "
                     f"est. {offline_flops_estimate(c, n_params, tokens):.2g} FLOPs)" for label, _, c in ar.runs]
            lines.append(f"  {ar.arm.name} [offline]: " + "; ".join(parts))
        else:
            c = ar.runs[0][2]
            lines.append(f"  {ar.arm.name} [{ar.method}]: training.max_steps {c.training['max_steps']} "
                         f"(est. {rl_step_flops_estimate(c, n_params, tokens):.2g} FLOPs per step), checkpoint every "
                         f"{c.training['save_steps']} steps")
    for ar in runs:
        for label, _, _ in ar.runs:
            done = [f for f in (root / "points" / ar.arm.name / f"seed={ar.seed}").glob("*.json")] \
                if ar.method != OFFLINE else \
                list((root / "points" / ar.arm.name / f"seed={ar.seed}").glob(f"{label}.json"))
            status = f"{len(done)} point(s) done" if done else "to run"
            lines.append(f"    seed {ar.seed} {ar.arm.name} {label}: {status}")
    seconds = _seconds_estimate(spec, runs, n_params, tokens)
    lines.append(f"  estimated time on 2 CPU cores (the demo's timings scaled by N and tokens): "
                 f"{sum(seconds.values()) / 60:.0f} min (" +
                 ", ".join(f"{k} {v / 60:.0f} min" for k, v in seconds.items()) + ")")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def _shared_config(spec: CompareSpec, cli_overrides: list[str], seed: int, scale: float, root: Path) -> Config:
    """The base config at this seed and scale, without any arm's overrides: the shared stages of its offline arms."""
    base = base_config(spec, cli_overrides)
    cfg = _load(spec, cli_overrides, {"seed": seed},
                scaled(base.data.num_train, int(base.training.get("max_steps", 1)), scale))
    cfg.output_dir = str(root / "shared" / f"seed={seed}" / f"scale={scale:g}")
    return cfg


def _run_pipeline(cfg: Config, progress: bool, shared: Path | None) -> None:
    from ..tracking import Tracker
    from .pipeline import Pipeline

    run_dir = Path(cfg.output_dir)
    with hold_folder(run_dir):
        if shared is not None:
            link_shared_stages(shared, cfg)
        tracker = Tracker(cfg, run_dir)
        try:
            Pipeline(cfg, progress=progress).run(tracker=tracker)
        finally:
            tracker.finish()


def _compute_record(cfg: Config, n_params: int) -> dict[str, Any]:
    """The run's compute.json (an offline run trained before it was written: made from its files now)."""
    from .pipeline import COMPUTE_FILE, offline_compute

    run_dir = Path(cfg.output_dir)
    path = run_dir / COMPUTE_FILE
    if path.exists():
        return read_json(path)
    if method_of(cfg) != OFFLINE:
        raise ConfigError(f"compare: the {method_of(cfg)} run in '{run_dir}' wrote no {COMPUTE_FILE}; "
                          "its training stage must record what it spent")
    state = read_json(run_dir / "stages" / "training.json")
    record = offline_compute(run_dir, cfg, n_params, train_seconds=float(state["seconds"]),
                             final_step=int(state["summary"]["steps"]),
                             trained_tokens=int(state["summary"]["trained_tokens"]))
    atomic_write_json(path, record)
    return record


def _eval_point(point: dict[str, Any], adapter: Path, eval_cfg: Config, out: Path, progress: bool) -> dict[str, Any]:
    from ..evaluation.accuracy import per_problem_delta, per_problem_rewards
    from ..evaluation.runner import run_eval
    from ..tracking import Tracker
    from ..utils.storage import read_jsonl_cut_torn_tail

    quiet = Tracker(eval_cfg, out, enabled=False)  # the compare's own W&B run gets the table
    shared = Path(eval_cfg.output_dir)
    result = run_eval(eval_cfg, adapter_path=adapter, base_path=eval_cfg.model.name_or_path, out=out,
                      progress=progress, tracker=quiet, base_samples_dir=shared / "eval_samples")
    acc, mov = result["accuracy"], result["movement"]
    base = read_jsonl_cut_torn_tail(shared / "eval_samples" / "base_samples.jsonl")
    adapted = read_jsonl_cut_torn_tail(out / "eval_samples" / "adapter_samples.jsonl")
    fork, nonfork = mov.get("fork") or {}, mov.get("nonfork") or {}
    n_f, n_n = mov["positions"]["fork"], mov["positions"]["nonfork"]
    kl_all = ((fork.get("kl_mean") or 0.0) * n_f + (nonfork.get("kl_mean") or 0.0) * n_n) / (n_f + n_n) \
        if n_f + n_n else None
    return {
        **point,
        "adapter": str(adapter),
        "delta_pass_at_1": acc["delta_pass_at_1"]["mean"], "delta_ci95": acc["delta_pass_at_1"]["ci95"],
        "pass_at_1_base": acc["base"]["pass_at_1"], "pass_at_1_adapter": acc["adapter"]["pass_at_1"],
        "kl_mean_all": kl_all, "kl_fork": fork.get("kl_mean"), "kl_nonfork": nonfork.get("kl_mean"),
        "kl_ratio": mov.get("kl_ratio"), "kl_share_at_forks": mov.get("kl_share_at_forks"),
        "kl_share_top20_entropy": mov.get("kl_share_top20_entropy"),
        **{f"{where}_{cls}": d.get(cls) for where, d in (("fork", fork),
           ("nonfork", nonfork)) for cls in ("shifted", "reranked")},
        "per_problem_delta": per_problem_delta(per_problem_rewards(base), per_problem_rewards(adapted)),
    }


def _spent(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k) for k in ("flops", "wall_seconds", "forward_tokens", "trained_tokens")}


def rl_checkpoints(record: dict[str, Any], run_dir: Path, budget: float,
                   fractions: list[float]) -> list[tuple[int, float, Path, dict[str, Any]]]:
    """For each fraction of the budget, the saved point (a checkpoint or the final adapter) whose
    cumulative FLOPs are nearest: (fraction index, fraction, adapter folder, its compute entry), each folder once."""
    candidates = [(c, run_dir / "checkpoints" / f"checkpoint-{c['step']}") for c in record.get("checkpoints", [])]
    candidates = [(c, p) for c, p in candidates if (p / "adapter_config.json").exists()]
    if (run_dir / "adapter" / "adapter_config.json").exists():
        candidates.append((record["total"], run_dir / "adapter"))
    out, used = [], set()
    for i, f in enumerate(fractions):
        if not candidates:
            break
        entry, path = min(candidates, key=lambda cp: abs(cp[0]["flops"] - f * budget))
        if path not in used:
            used.add(path)
            out.append((i, f, path, entry))
    return out


def _point_file(root: Path, arm: str, seed: int, label: str) -> Path:
    return root / "points" / arm / f"seed={seed}" / f"{label}.json"


def point_fingerprint(cfg: Config, eval_cfg: Config, **where: Any) -> str:
    """What a point depends on: its run's training stage, the seed's problems and evaluation, and
    ``where`` (an RL point's budget and fraction choose its checkpoint)."""
    from .pipeline import Pipeline

    return fingerprint({"training": Pipeline(cfg).fingerprints()["training"],
                        "problems": Pipeline(eval_cfg).fingerprints()["problems"],
                        "eval": eval_cfg.to_dict()["eval"], **where})


def _finished_point(path: Path, fp: str, run_dir: str) -> dict[str, Any] | None:
    """The point in ``path`` if it was made with these settings; None if there is none."""
    if not path.exists():
        return None
    point = read_json(path)
    if point.get("fingerprint", fp) != fp:  # points written before fingerprints were kept are taken as they are
        raise ConfigError(f"compare: '{path}' was made with other settings (its run '{run_dir}', the evaluation "
                          f"or the budget changed since); move both away to redo it, or give the compare another name")
    return point


def _arm_points(spec: CompareSpec, cli_overrides: list[str], ar: ArmRun, root: Path, n_params: int,
                progress: bool) -> list[dict[str, Any]]:
    eval_cfg = eval_config(spec, cli_overrides, ar.seed)
    points = []
    for index, (label, scale, cfg) in enumerate(ar.runs):
        if ar.method == OFFLINE:
            done = _point_file(root, ar.arm.name, ar.seed, label)
            fp = point_fingerprint(cfg, eval_cfg)
            if (finished := _finished_point(done, fp, cfg.output_dir)) is not None:
                points.append(finished)
                continue
            print(f"\n=== compare {spec.name}: {ar.arm.name}, seed {ar.seed}, {label}", flush=True)
            shared = _shared_config(spec, cli_overrides, ar.seed, scale, root)
            with hold_folder(shared.output_dir):
                run_shared_stages(shared, progress)
            _run_pipeline(cfg, progress, Path(shared.output_dir))
            record = _compute_record(cfg, n_params)
            point = {"arm": ar.arm.name, "method": ar.method, "seed": ar.seed, "index": index, "label": label,
                     "scale": scale, "run_dir": cfg.output_dir, "step": record["total"].get("step"),
                     "fingerprint": fp, **_spent(record["total"])}
            row = _eval_point(point, Path(cfg.output_dir) / "adapter", eval_cfg,
                              root / "evals" / ar.arm.name / f"seed={ar.seed}" / label, progress)
            atomic_write_json(done, row)
            points.append(row)
        else:
            from .pipeline import Pipeline

            pipeline = Pipeline(cfg)
            state = pipeline.state("training") or {}
            if not state.get("done") or state.get("fingerprint") != pipeline.fingerprints()["training"] or \
                    not (Path(cfg.output_dir) / "compute.json").exists():
                # resumes an unfinished run; refuses, with the differing settings, a run made with others
                print(f"\n=== compare {spec.name}: {ar.arm.name} ({ar.method}), seed {ar.seed}", flush=True)
                _run_pipeline(cfg, progress, None)
            record = _compute_record(cfg, n_params)
            for i, fraction, path, entry in rl_checkpoints(record, Path(cfg.output_dir), spec.budget,
                                                           spec.checkpoints):
                plabel = f"budget={fraction:g}"
                fp = point_fingerprint(cfg, eval_cfg, budget=spec.budget, fraction=fraction)
                if (finished := _finished_point(_point_file(root, ar.arm.name, ar.seed, plabel), fp,
                                                cfg.output_dir)) is not None:
                    points.append(finished)
                    continue
                step = entry.get("step", record["total"].get("step"))
                point = {"arm": ar.arm.name, "method": ar.method, "seed": ar.seed, "index": i, "label": plabel,
                         "fraction": fraction, "run_dir": cfg.output_dir, "step": step, "fingerprint": fp,
                         **_spent(entry)}
                row = _eval_point(point, path, eval_cfg, root / "evals" / ar.arm.name / f"seed={ar.seed}" / plabel,
                                  progress)
                atomic_write_json(_point_file(root, ar.arm.name, ar.seed, plabel), row)
                points.append(row)
    return points


def run_compare(config_path: str | None, cli_overrides: list[str], compare_path: str, progress: bool = True) -> Path:
    """Run every arm x seed to the budget, evaluate its points; write compare.{md,json,png} and return its folder."""
    from ..evaluation.comparison import arm_curve, ratio_rows, write_comparison
    from ..tracking import Tracker
    from .pipeline import Pipeline

    spec = load_compare(compare_path)
    spec.config = spec.config or config_path
    base = base_config(spec, cli_overrides)
    n_params = parameter_count(spec, base)
    runs = plan_runs(spec, cli_overrides, n_params)  # every config validated before any work
    root = compare_dir(spec, base)
    all_points: dict[str, list[dict[str, Any]]] = {a.name: [] for a in spec.arms}
    with hold_folder(root, name=".compare.lock", what=f"compare folder '{root}'"):
        for seed in spec.seeds:  # the held-out problems every point of this seed is evaluated on
            eval_cfg = eval_config(spec, cli_overrides, seed)
            Pipeline(eval_cfg, progress=progress).run(stages=("problems",),
                                                      tracker=Tracker(eval_cfg, Path(eval_cfg.output_dir),
                                                                      enabled=False))
        for ar in runs:
            try:
                all_points[ar.arm.name] += _arm_points(spec, cli_overrides, ar, root, n_params, progress)
            except UserError as err:  # e.g. a small scale with no mixed-success problem: the other arms go on
                if isinstance(err, ConfigError):  # settings to fix (or a stale point): nothing else would be right
                    raise
                logger.warning("compare: arm %s, seed %d: %s", ar.arm.name, ar.seed, err)
        curves = {arm: arm_curve(pts, resamples=base.eval.bootstrap, seed=base.seed)
                  for arm, pts in all_points.items() if pts}
        ratios = ratio_rows(all_points, curves, spec.reference, resamples=base.eval.bootstrap, seed=base.seed)
        kinds = {ar.arm.name: ar.method for ar in runs}
        spent = budget_spent(spec, runs, all_points, tokens_per_sample(spec, base))
        atomic_write_json(root / "compare.json", {
            "name": spec.name, "budget": spec.budget, "checkpoints": spec.checkpoints, "seeds": spec.seeds,
            "reference": spec.reference, "n_params": n_params, "arms": [dataclasses.asdict(a) for a in spec.arms],
            "kinds": kinds, "spent": spent, "curves": curves, "ratios": ratios, "points": all_points})
        write_comparison(root, spec.name, budget=spec.budget, reference=spec.reference, curves=curves,
                         ratios=ratios, kinds=kinds, spent=spent)
    if base.tracking.report_to == "wandb":
        _log_to_wandb(base, root, spec.name, curves, ratios)
    return root


def budget_spent(spec: CompareSpec, runs: list[ArmRun], points: dict[str, list[dict[str, Any]]],
                 estimated_tokens: int) -> dict[str, Any]:
    """How much of the budget each arm spent per seed (an offline arm's largest scale, an RL run's
    total, over the budget), and the tokens per sample the RL runs measured in the estimate's terms
    (trained tokens over steps x per-device batch x accumulation): the figure for ``tokens_per_sample``."""
    arms: dict[str, Any] = {}
    measured: list[float] = []
    for ar in runs:
        entry = arms.setdefault(ar.arm.name, {"fraction_by_seed": {}})
        if ar.method == OFFLINE:
            mine = [p["flops"] for p in points.get(ar.arm.name, []) if p["seed"] == ar.seed]
            if mine:
                entry["fraction_by_seed"][str(ar.seed)] = max(mine) / spec.budget
            continue
        cfg = ar.runs[0][2]
        path = Path(cfg.output_dir) / "compute.json"
        if path.exists():
            total = read_json(path)["total"]
            entry["fraction_by_seed"][str(ar.seed)] = total["flops"] / spec.budget
            if total.get("trained_tokens"):
                measured.append(total["trained_tokens"] / (int(cfg.training["max_steps"]) * samples_per_step(cfg)))
    return {"tokens_per_sample_estimate": estimated_tokens,
            "tokens_per_sample_measured": float(sum(measured) / len(measured)) if measured else None, "arms": arms}


def _log_to_wandb(base: Config, root: Path, name: str, curves: dict[str, list[dict[str, Any]]],
                  ratios: list[dict[str, Any]]) -> None:
    from ..tracking import Tracker

    cfg = dataclasses.replace(base, tracking=dataclasses.replace(
        base.tracking, run_name=f"{name}-compare", group=base.tracking.group or name))
    tracker = Tracker(cfg, root)
    try:
        tracker.log_table("compare_points", [{"arm": arm, **{k: v for k, v in c.items()}}
                                             for arm, curve in curves.items() for c in curve])
        tracker.log_table("compare_ratios", [{"arm": r["arm"], "reference": r["reference"],
                                              "final_delta": r["final_delta"], "final_flops": r["final_flops"],
                                              **{f"to_reach_reference_{k}": v for k, v in
                                                 r["to_reach_reference"].items()},
                                              **{f"reference_to_reach_arm_{k}": v for k, v in
                                                 r["reference_to_reach_arm"].items()}} for r in ratios])
        if tracker.run is not None:
            import wandb

            tracker.run.log({"compare/plot": wandb.Image(str(root / "compare.png"))})
            for arm, curve in curves.items():
                for c in curve:
                    tracker.run.log({f"compare/{arm}/pass_at_1": c["pass_at_1_adapter"],
                                     f"compare/{arm}/delta_pass_at_1": c["delta_pass_at_1"],
                                     f"compare/{arm}/flops": c["flops"]})
    finally:
        tracker.finish()

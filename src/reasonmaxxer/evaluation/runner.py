"""Evaluation of an adapter against its base on held-out problems.

(a) Movement: held-out rollouts sampled from the base are teacher-forced through the base
(adapter disabled) and the policy; per completion position we measure KL, JS, top-1
agreement, shift class and Δlog p, split by the training gate into forks and non-forks.
(b) Accuracy: pass@1 / pass@k / greedy accuracy of both models on the same problems, and
the paired bootstrap interval of Δpass@1.

Every sampling step writes incrementally under ``<out>/`` and resumes like training's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..core.gate import gate_mask
from ..data.problem import Problem, read_split
from ..data.sources import load_problems
from ..errors import ConfigError, DataError
from ..stages.rollouts import RolloutReward, run_rollouts
from ..stages.sampling import resolve_prompt_format
from ..training.model_card import write_model_card
from ..utils.sequences import pack_batch, pad_ragged
from ..utils.storage import atomic_write_json, fingerprint, read_json, read_jsonl_cut_torn_tail
from .accuracy import accuracy_summary, paired_bootstrap_delta, per_problem_rewards


def heldout_problems(cfg: Config) -> list[Problem]:
    """The run's held-out split (from its problems.jsonl, else regenerated from the config)."""
    path = Path(cfg.output_dir) / "problems.jsonl"
    if path.exists():
        problems = read_split(path, "heldout")
    else:
        problems = load_problems(cfg.data, seed=cfg.seed)[1]
    if not problems:
        raise DataError("eval: there are no held-out problems; set data.num_heldout > 0 and rerun the problems stage")
    return problems[: cfg.eval.max_problems] if cfg.eval.max_problems else problems


def load_policy(base_path: str, adapter_path: Path, cfg: Config) -> tuple[Any, Any]:
    """Base model with the adapter attached (PeftModel) and its tokenizer."""
    from peft import PeftModel

    from ..models.loading import check_model_source, load_model, load_tokenizer

    check_model_source(base_path)
    if not (adapter_path / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: '{adapter_path}' is not a PEFT adapter folder (no adapter_config.json); "
                          "train first or pass --adapter PATH")
    tokenizer = load_tokenizer(base_path, trust_remote_code=cfg.model.trust_remote_code)
    base = load_model(base_path, dtype=cfg.model.dtype, device=cfg.model.device,
                      trust_remote_code=cfg.model.trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_path))
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln or "Missing key" in ln), lines[0] if lines else "")
        raise ConfigError(f"--adapter: '{adapter_path}' does not match the base '{base_path}': {first[:300]}") from None
    model.eval()
    return model, tokenizer


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _reset_if_stale(folder: Path, side: str, settings: dict[str, Any]) -> None:
    """One side's samples ("base_*" or "adapter_*") are reused only if made with the same settings."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / f"{side}_settings.json"
    fp = fingerprint(settings)
    if stamp.exists() and read_json(stamp).get("fingerprint") == fp:
        return
    for old in folder.glob(f"{side}_*.jsonl"):
        old.unlink()
    atomic_write_json(stamp, {"fingerprint": fp})


def sample_both(model: Any, tokenizer: Any, problems: list[Problem], cfg: Config, out: Path, progress: bool,
                *, adapter_path: Path, base_path: str, base_out: Path | None = None,
                reward: RolloutReward | None = None) -> dict[str, list[dict[str, Any]]]:
    """Sampled (k per problem) and greedy rollouts of base and adapter, same seeds for both.

    Base samples go to ``base_out`` (default ``out``): a sweep shares them between points.
    ``reward`` (default: built from ``cfg``) scores them as the training rollouts were.
    """
    k = cfg.eval.num_samples
    sampled_cfg = dataclasses.replace(cfg.rollout, num_samples=k)
    greedy_cfg = dataclasses.replace(cfg.rollout, num_samples=1, batch_size=max(cfg.rollout.batch_size, 1))
    seed = cfg.seed + 7919  # not the training rollouts' seed
    shared = {"base": base_path, "rollout": dataclasses.asdict(cfg.rollout), "eval": dataclasses.asdict(cfg.eval),
              "data": dataclasses.asdict(cfg.data), "reward": dataclasses.asdict(cfg.reward),
              "problems": [p.id for p in problems], "seed": cfg.seed}
    # Same prompts and rewards as the training rollouts; the reward function is imported once.
    reward = reward if reward is not None else RolloutReward.from_config(cfg)
    prompt_format = resolve_prompt_format(tokenizer, cfg.data)
    folders = {"base": base_out or out, "adapter": out}
    _reset_if_stale(folders["base"], "base", shared)
    _reset_if_stale(out, "adapter", {**shared, "adapter": _file_digest(adapter_path / "adapter_model.safetensors")})
    samplers = _vllm_samplers(cfg, base_path, adapter_path) if cfg.rollout.backend == "vllm" else None
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for who in ("base", "adapter"):
            folder = folders[who]
            sampler = samplers[who] if samplers else model
            merge = samplers is None and who == "adapter"
            if merge:
                model.merge_adapter()  # merged weights generate as fast as the base
            try:
                ctx = model.disable_adapter() if samplers is None and who == "base" else contextlib.nullcontext()
                with ctx:
                    run_rollouts(sampler, tokenizer, problems, cfg.data, sampled_cfg, folder / f"{who}_samples.jsonl",
                                 seed=seed, progress=progress, desc=f"eval {who} samples", reward=reward,
                                 prompt_format=prompt_format)
                    if cfg.eval.greedy:
                        run_rollouts(sampler, tokenizer, problems, cfg.data, greedy_cfg, folder / f"{who}_greedy.jsonl",
                                     seed=seed, progress=progress, do_sample=False, desc=f"eval {who} greedy",
                                     reward=reward, prompt_format=prompt_format)
            finally:
                if merge:
                    model.unmerge_adapter()
            results[f"{who}_samples"] = read_jsonl_cut_torn_tail(folder / f"{who}_samples.jsonl")
            results[f"{who}_greedy"] = read_jsonl_cut_torn_tail(folder / f"{who}_greedy.jsonl") if cfg.eval.greedy else None
    finally:
        if samplers:  # shut the engine down: the movement pass after this needs its memory
            samplers["base"].close()
    return results


def _vllm_samplers(cfg: Config, base_path: str, adapter_path: Path) -> dict[str, Any]:
    """One vLLM engine with LoRA enabled: the base as it is, and with the adapter (``rollout.backend: vllm``)."""
    from ..models.loading import resolve_model_path
    from ..stages.vllm_backend import VllmSampler

    r = cfg.rollout
    engine = VllmSampler(resolve_model_path(base_path), dtype=cfg.model.dtype, seed=cfg.seed,
                         trust_remote_code=cfg.model.trust_remote_code,
                         gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                         tensor_parallel_size=r.vllm_tensor_parallel_size, max_model_len=r.vllm_max_model_len,
                         max_lora_rank=cfg.lora.r)
    return {"base": engine, "adapter": engine.with_adapter(str(adapter_path.resolve()))}


def accuracy_report(samples: dict[str, Any], cfg: Config) -> dict[str, Any]:
    k = cfg.eval.num_samples
    return {
        "base": accuracy_summary(samples["base_samples"], samples["base_greedy"], k),
        "adapter": accuracy_summary(samples["adapter_samples"], samples["adapter_greedy"], k),
        "delta_pass_at_1": paired_bootstrap_delta(
            per_problem_rewards(samples["base_samples"]), per_problem_rewards(samples["adapter_samples"]),
            resamples=cfg.eval.bootstrap, seed=cfg.seed,
        ),
    }


def movement_gate(gate: Any) -> Any:
    """The entropy gate whose forks movement is split by.

    The controls (``random``, ``all``) are measured at the forks of their reference
    entropy gate: the question is whether an adapter moved the policy at the high-entropy
    positions, whatever positions it was trained on.
    """
    if gate.mode in ("random", "all"):
        return dataclasses.replace(gate, mode=gate.reference)
    return gate


def pick_movement_rollouts(rollouts: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n rollouts alternating correct and wrong (then whatever is left), in file order."""
    correct = [r for r in rollouts if r["reward"] > 0]
    wrong = [r for r in rollouts if r["reward"] <= 0]
    picked: list[dict[str, Any]] = []
    while len(picked) < n and (correct or wrong):
        for pool in (correct, wrong):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return picked


@torch.no_grad()
def movement_positions(model: Any, tokenizer: Any, rollouts: list[dict[str, Any]], cfg: Config,
                       entropy_temperature: float, progress: bool) -> dict[str, Any]:
    """Per-position movement over the given base rollouts, flattened, with the gate's forks."""
    from .movement import movement_for_batch

    device = next(model.parameters()).device
    per_rollout: list[dict[str, torch.Tensor]] = []
    bs = cfg.scoring.batch_size
    for s in tqdm(range(0, len(rollouts), bs), desc="eval movement", unit="batch", disable=not progress):
        chunk = rollouts[s : s + bs]
        packed = pack_batch([r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk],
                            tokenizer.pad_token_id)
        packed = {k: v.to(device) for k, v in packed.items()}
        stats = movement_for_batch(model, packed, chunk_size=cfg.scoring.chunk_size,
                                   entropy_temperature=entropy_temperature)
        for i, r in enumerate(chunk):
            L = len(r["completion_ids"])
            per_rollout.append({k: v[i, :L].cpu() for k, v in stats.items()})
    lengths = [len(r["completion_ids"]) for r in rollouts]
    C = max(lengths)
    mask = pad_ragged([torch.ones(L, dtype=torch.bool) for L in lengths], C, False)
    base_h = pad_ragged([p["base_entropy"] for p in per_rollout], C)
    correct = torch.tensor([r["reward"] > 0 for r in rollouts])  # for gate.tau_pos / tau_neg
    forks = gate_mask(movement_gate(cfg.gate), base_h, mask, positive=correct)
    flat = {k: torch.cat([p[k] for p in per_rollout]) for k in per_rollout[0]}
    flat["fork"] = forks[mask]
    flat["correct"] = torch.cat([torch.full((L,), r["reward"] > 0) for L, r in zip(lengths, rollouts)])
    flat["rollout"] = torch.cat([torch.full((L,), i) for i, L in enumerate(lengths)])
    flat["position"] = torch.cat([torch.arange(L) for L in lengths])
    flat["token_id"] = torch.cat([torch.tensor(r["completion_ids"]) for r in rollouts])
    return {"flat": flat, "mask": mask, "base_entropy_padded": base_h,
            "policy_entropy_padded": pad_ragged([p["policy_entropy"] for p in per_rollout], C)
            if "policy_entropy" in per_rollout[0] else None}


def movement_report(pos: dict[str, Any], cfg: Config, entropy_temperature: float) -> dict[str, Any]:
    from .movement import entropy_deciles, high_entropy_overlap, kl_share_high_entropy, summarize

    flat = pos["flat"]
    report = summarize(flat, flat["fork"], flat["correct"])
    report["gate"] = {**dataclasses.asdict(cfg.gate), "entropy_temperature": entropy_temperature,
                      "measured_at": movement_gate(cfg.gate).mode}
    if pos["policy_entropy_padded"] is not None:
        report["high_entropy_overlap"] = high_entropy_overlap(
            pos["base_entropy_padded"], pos["policy_entropy_padded"], pos["mask"], quantile=0.2)
    else:
        report["high_entropy_overlap"] = None
    # The gate-free view: KL mass at the base's top-20% entropy positions (the same set for any adapter).
    report["kl_share_top20_entropy"] = kl_share_high_entropy(flat["base_entropy"], flat["kl"], quantile=0.2)
    report["entropy_deciles"] = entropy_deciles(flat["base_entropy"], flat["kl"], flat["top1_agree"])
    return report


def most_moved(pos: dict[str, Any], rollouts: list[dict[str, Any]], tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """The n positions with the largest KL, with their context, for tables and the report."""
    flat = pos["flat"]
    order = torch.argsort(flat["kl"], descending=True)[:n].tolist()
    rows = []
    for j in order:
        r = rollouts[int(flat["rollout"][j])]
        t = int(flat["position"][j])
        rows.append({
            "context": tokenizer.decode(r["completion_ids"][max(0, t - 12) : t]),
            "token": tokenizer.decode([r["completion_ids"][t]]),
            "base_p": float(flat["base_logp"][j].exp()),
            "policy_p": float(flat["policy_logp"][j].exp()),
            "kl": float(flat["kl"][j]),
            "base_entropy": float(flat["base_entropy"][j]),
            "fork": bool(flat["fork"][j]),
            "correct_rollout": bool(flat["correct"][j]),
        })
    return rows


def run_eval(cfg: Config, *, adapter_path: Path, base_path: str, out: Path, progress: bool = True,
             tracker: Any = None, base_samples_dir: Path | None = None) -> dict[str, Any]:
    """Everything eval.py writes: movement.json, accuracy.json, report.md, plots, forks.html.

    Metrics go to ``tracker`` when given (left open), else to a new ``<run>-eval`` run.
    """
    from ..tracking import Tracker
    from .report import write_report

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    problems = heldout_problems(cfg)
    reward = RolloutReward.from_config(cfg)  # a bad reward.function stops before the model loads
    if cfg.rollout.backend == "vllm":
        from ..stages.vllm_backend import require_vllm

        require_vllm()
    model, tokenizer = load_policy(base_path, adapter_path, cfg)
    entropy_temperature = cfg.entropy_temperature
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    samples = sample_both(model, tokenizer, problems, cfg, out / "eval_samples", progress,
                          adapter_path=adapter_path, base_path=base_path, base_out=base_samples_dir, reward=reward)
    timings["sampling_s"] = time.perf_counter() - t0
    accuracy = accuracy_report(samples, cfg)
    atomic_write_json(out / "accuracy.json", accuracy)

    t0 = time.perf_counter()
    moved_on = pick_movement_rollouts(list(samples["base_samples"]), cfg.eval.movement_rollouts)
    pos = movement_positions(model, tokenizer, moved_on, cfg, entropy_temperature, progress)
    movement = movement_report(pos, cfg, entropy_temperature)
    timings["movement_s"] = time.perf_counter() - t0
    movement["rollouts"] = len(moved_on)
    atomic_write_json(out / "movement.json", movement)

    top = most_moved(pos, moved_on, tokenizer, cfg.eval.top_positions)
    write_report(out, movement=movement, accuracy=accuracy, positions=pos, rollouts=moved_on, tokenizer=tokenizer,
                 top=top)
    run_dir = Path(cfg.output_dir)
    if adapter_path.resolve() == (run_dir / "adapter").resolve():  # the run's own adapter: its card gets the results
        write_model_card(cfg, run_dir, eval_dir=out)
    timings["total_s"] = time.perf_counter() - start

    if tracker is not None:
        tracker.log_eval(movement, accuracy, top, pos["flat"])
    else:
        tracking_cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
            cfg.tracking, run_name=(cfg.tracking.run_name or Path(cfg.output_dir).name) + "-eval"))
        tracker = Tracker(tracking_cfg, out)
        try:
            tracker.log_eval(movement, accuracy, top, pos["flat"])
        finally:
            tracker.finish()
    return {"movement": movement, "accuracy": accuracy, "timings": timings}

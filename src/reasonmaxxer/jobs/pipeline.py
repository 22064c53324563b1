"""The offline recipe as stages: problems -> rollouts -> scoring -> selection -> training.

Each stage writes under the run folder and records ``stages/<name>.json`` with the
fingerprint of everything its output depends on (its settings and its inputs'
fingerprints). A rerun skips a stage whose fingerprint is unchanged and resumes one
that was interrupted. A folder whose stages were made with other settings is refused;
with ``overwrite`` those stages start over (and so does all that follows them).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import Config
from ..data.problem import Problem, read_split
from ..data.sources import load_problems
from ..errors import ConfigError, DataError
from ..tracking import Tracker, redact
from ..utils import distributed as dist
from ..utils.flops import ComputeLedger, base_parameter_count
from ..utils.storage import (
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    read_json,
    read_jsonl_cut_torn_tail,
    write_jsonl,
)

logger = logging.getLogger(__name__)

STAGES = ("problems", "rollouts", "scoring", "selection", "training")
SAMPLING_STAGES = ("problems", "training")
"""The stages of methods grpo and online: their trainer samples as it trains."""
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "problems": ("problems.jsonl",), "rollouts": ("rollouts.jsonl",), "scoring": ("scores",),
    "selection": ("selection.jsonl",),
    "training": ("checkpoints", "adapter", "train_log.json", "merged", "compute.json"),
}
"""What each stage writes under the run folder (cleared when its settings change)."""


@dataclasses.dataclass
class StageResult:
    name: str
    summary: dict[str, Any]
    seconds: float
    skipped: bool

    def line(self) -> str:
        status = "skipped (unchanged)" if self.skipped else f"{self.seconds:7.1f} s"
        parts = ", ".join(f"{k}={_fmt(v)}" for k, v in self.summary.items())
        return f"{self.name:<10} {status:>20}  {parts}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Pipeline:
    """One run of the recipe, rooted at ``cfg.output_dir``."""

    def __init__(self, cfg: Config, *, progress: bool = True, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.progress = progress
        self.overwrite = overwrite  # redo stages whose settings changed instead of refusing
        self._model = None
        self._tokenizer = None
        self._reward: Any = None  # the rollouts' RolloutReward, built once per run
        self.tracker: Tracker | None = None

    # ------------------------------------------------------------------ paths & state
    def path(self, name: str) -> Path:
        return self.run_dir / name

    def _state_path(self, stage: str) -> Path:
        return self.path("stages") / f"{stage}.json"

    def state(self, stage: str) -> dict[str, Any] | None:
        p = self._state_path(stage)
        return read_json(p) if p.exists() else None

    def fingerprints(self) -> dict[str, str]:
        """What each stage's output depends on, chained through its inputs."""
        c = self.cfg.to_dict()
        fp: dict[str, str] = {}
        fp["problems"] = fingerprint({"data": c["data"], "seed": c["seed"]})
        rollout = {k: v for k, v in c["rollout"].items() if k != "vllm_gpu_memory_utilization"}  # same samples
        # Sizes added later count only when set, so runs made before them keep their fingerprint.
        for key, default in (("vllm_tensor_parallel_size", 1), ("vllm_max_model_len", 0), ("batch_tokens", 0)):
            if rollout.get(key) == default:
                rollout.pop(key)
        fp["rollouts"] = fingerprint({"up": fp["problems"], "model": c["model"]["name_or_path"],
                                      "rollout": rollout, "seed": c["seed"], "reward": c["reward"]})
        fp["scoring"] = fingerprint({"up": fp["rollouts"], "scoring": c["scoring"],
                                     "temperature": self.cfg.entropy_temperature})
        fp["selection"] = fingerprint({"up": fp["rollouts"], "selection": c["selection"]})
        if self.cfg.method == "offline":
            fp["training"] = fingerprint({"up": [fp["selection"], fp["scoring"]], "gate": self.cfg.gate.effective(),
                                          "loss": c["loss"],
                                          "lora": c["lora"], "training": c["training"], "seed": c["seed"]})
            return fp
        from ..config import grpo_arguments

        # The trainer samples, rewards and (online) gates itself: all of that is in its fingerprint.
        # The global batch, not this launch's split of it: a resume on another number of processes is the same run.
        sampling = {"up": fp["problems"], "method": self.cfg.method, "grpo": grpo_arguments(self.cfg, world_size=1),
                    "model": c["model"]["name_or_path"], "data": c["data"], "reward": c["reward"],
                    "lora": c["lora"], "seed": c["seed"]}
        if self.cfg.method == "online":
            sampling.update(gate=self.cfg.gate.effective(), loss=c["loss"], temperature=self.cfg.entropy_temperature,
                            advantage_clip=self.cfg.selection.advantage_clip)
        fp["training"] = fingerprint(sampling)
        return fp

    def stage_names(self) -> tuple[str, ...]:
        """The stages of this run's method."""
        return STAGES if self.cfg.method == "offline" else SAMPLING_STAGES

    # ------------------------------------------------------------------ model
    def model_and_tokenizer(self) -> tuple[Any, Any]:
        if self._model is None:
            from ..models.loading import load_model, load_tokenizer

            m = self.cfg.model
            self._tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
            self._model = load_model(m.name_or_path, dtype=m.dtype, device=dist.process_device(m.device),
                                     trust_remote_code=m.trust_remote_code)
            self._model.eval()
        return self._model, self._tokenizer

    # ------------------------------------------------------------------ running
    def run(self, only: str | None = None, *, stages: Sequence[str] | None = None,
            tracker: Tracker | None = None) -> list[StageResult]:
        """Run the stages in order (or ``only`` one); a given ``tracker`` is used and left open."""
        stages = self.stage_names() if stages is None else stages
        if only is not None and only not in STAGES:
            raise ConfigError(f"--stage: unknown stage '{only}'; stages are {', '.join(STAGES)}")
        if only is not None and only not in self.stage_names():
            raise ConfigError(f"--stage: method {self.cfg.method} has no {only} stage (its trainer samples as it "
                              f"trains); its stages are {', '.join(self.stage_names())}")
        if only is None or only in ("rollouts", "scoring", "training"):
            from ..models.loading import check_model_source

            check_model_source(self.cfg.model.name_or_path)
        if only in (None, "rollouts", "training") and self.cfg.reward.function is not None:
            from ..stages.rollouts import RolloutReward

            self._reward = RolloutReward.from_config(self.cfg)  # a bad reward.function stops before any work
        fps = self.fingerprints()
        if only in (None, "rollouts") and self.cfg.rollout.backend == "vllm" and self.cfg.method == "offline":
            done = self.state("rollouts") or {}
            if not (done.get("done") and done.get("fingerprint") == fps["rollouts"]):  # they will be sampled
                if dist.world_size() > 1:
                    raise ConfigError("rollout.backend: vllm uses the GPUs of one process; run `--stage rollouts` "
                                      "with `python train.py`, then the other stages with torchrun")
                from ..stages.vllm_backend import require_vllm

                require_vllm()
        if only in (None, "training") and self.cfg.method != "offline" and self.cfg.grpo.get("use_vllm"):
            from ..stages.vllm_backend import require_vllm

            require_vllm("grpo.use_vllm: true", instead="sample with transformers (grpo.use_vllm: false)")  # TRL would stop with a traceback when its trainer is built
        if only in (None, "training") and self.cfg.eval.every_steps:
            from ..training.heldout_eval import sharded_weights

            if (sharded := sharded_weights(self.cfg.training)) is not None:
                raise ConfigError(f"eval.every_steps: evaluation during training samples with the whole model in each "
                                  f"process, which {sharded} shards; set eval.every_steps: 0 and run eval.py after")
        self._refuse_other_config(fps, [s for s in stages if only is None or s == only])
        dist.init()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            atomic_write_text(self.path("config.yaml"), yaml.safe_dump(redact(self.cfg.to_dict()), sort_keys=False))
        # One W&B run per job: only the main process logs.
        self.tracker = tracker if tracker is not None else Tracker(self.cfg, self.run_dir, enabled=dist.is_main())
        results = []
        try:
            for stage in stages:
                if only is not None and stage != only:
                    continue
                if only is not None:
                    self._require_upstream(stage, fps)
                results.append(self._run_stage(stage, fps[stage]))
        finally:
            if tracker is None:
                self.tracker.finish()
        return results

    def _refuse_other_config(self, fps: dict[str, str], stages: Sequence[str]) -> None:
        """Stop before any work when the folder holds stages made with other settings.

        Redoing them would delete their outputs (hours of rollouts, a trained adapter),
        so that takes ``--overwrite``.
        """
        changed = [s for s in stages if (st := self.state(s)) is not None and st.get("fingerprint") != fps[s]]
        if not changed or self.overwrite:
            return
        saved = self.path("config.yaml")
        diff = _config_diff(yaml.safe_load(saved.read_text()) if saved.exists() else {}, redact(self.cfg.to_dict()))
        raise ConfigError(
            f"output_dir: '{self.run_dir}' holds a run made with a different config ({diff}); its "
            f"{', '.join(changed)} output would be deleted and redone. Use another output_dir, or pass "
            f"--overwrite to redo it"
        )

    def _require_upstream(self, stage: str, fps: dict[str, str]) -> None:
        needs = {"rollouts": ["problems"], "scoring": ["rollouts"], "selection": ["rollouts"],
                 "training": ["selection", "scoring"] if self.cfg.method == "offline" else ["problems"]}.get(stage, [])
        for up in needs:
            st = self.state(up)
            if st is None or st.get("fingerprint") != fps[up] or not st.get("done"):
                raise DataError(f"--stage {stage}: stage '{up}' has not run with this config in {self.run_dir}; "
                                f"run `--stage {up}` first, or all stages without --stage")

    def _run_stage(self, stage: str, fp: str) -> StageResult:
        # Every process reads the state before the main process changes it, so all of
        # them take the same branch; only the main process writes state and shared files.
        state = self.state(stage)
        dist.barrier()
        if state is not None and state.get("fingerprint") == fp and state.get("done"):
            summary = state["summary"]
            if stage == "scoring" and summary.get("share_tau") != self.cfg.gate.tau:
                summary = {**summary, **self._share_above_tau(self._scored_entropy())}
                if dist.is_main():
                    atomic_write_json(self._state_path(stage), {**state, "summary": summary})
            return StageResult(stage, summary, state["seconds"], skipped=True)
        if dist.is_main():
            if state is not None and state.get("fingerprint") != fp:
                self._clear_outputs(stage)  # settings changed: what is there belongs to another config
            atomic_write_json(self._state_path(stage), {"fingerprint": fp, "done": False})
        dist.barrier()
        start = time.perf_counter()
        summary = getattr(self, f"stage_{stage}")()
        seconds = time.perf_counter() - start
        dist.barrier()
        if dist.is_main():
            atomic_write_json(self._state_path(stage),
                              {"fingerprint": fp, "done": True, "summary": summary, "seconds": seconds})
        if self.tracker is not None:
            self.tracker.summary(stage, {**summary, "seconds": seconds})
        return StageResult(stage, summary, seconds, skipped=False)

    def _clear_outputs(self, stage: str) -> None:
        for name in STAGE_OUTPUTS[stage]:
            p = self.path(name)
            if p.is_symlink():  # a sweep point's link to shared outputs: drop the link only
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # ------------------------------------------------------------------ stages
    def stage_problems(self) -> dict[str, Any]:
        train, heldout = load_problems(self.cfg.data, seed=self.cfg.seed)
        rows = [{**dataclasses.asdict(p), "split": "train"} for p in train]
        rows += [{**dataclasses.asdict(p), "split": "heldout"} for p in heldout]
        if dist.is_main():
            write_jsonl(self.path("problems.jsonl"), rows)
        return {"train": len(train), "heldout": len(heldout)}

    def problems(self, split: str) -> list[Problem]:
        return read_split(self.path("problems.jsonl"), split)

    def stage_rollouts(self) -> dict[str, Any]:
        from ..stages.rollouts import RolloutReward

        if self._reward is None:
            self._reward = RolloutReward.from_config(self.cfg)

        if self.cfg.rollout.backend == "vllm":  # one process (checked before any work)
            from ..models.loading import load_tokenizer, resolve_model_path
            from ..stages.vllm_backend import VllmSampler

            m = self.cfg.model
            path = resolve_model_path(m.name_or_path)
            model = VllmSampler(path, dtype=m.dtype, seed=self.cfg.seed, trust_remote_code=m.trust_remote_code,
                                gpu_memory_utilization=self.cfg.rollout.vllm_gpu_memory_utilization,
                                tensor_parallel_size=self.cfg.rollout.vllm_tensor_parallel_size,
                                max_model_len=self.cfg.rollout.vllm_max_model_len)
            tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
            with model:  # the engine shuts down after the stage, and frees its memory for scoring and training
                return self._run_rollouts(model, tokenizer)
        model, tokenizer = self.model_and_tokenizer()
        return self._run_rollouts(model, tokenizer)

    def _run_rollouts(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from ..stages.rollouts import run_rollouts

        return run_rollouts(model, tokenizer, self.problems("train"), self.cfg.data, self.cfg.rollout,
                            self.path("rollouts.jsonl"), seed=self.cfg.seed, progress=self.progress,
                            reward=self._reward)

    def rollouts(self) -> list[dict[str, Any]]:
        return read_jsonl_cut_torn_tail(self.path("rollouts.jsonl"))

    def stage_scoring(self) -> dict[str, Any]:
        from ..stages.scoring import score_rollouts

        model, tokenizer = self.model_and_tokenizer()
        rollouts = self.rollouts()
        summary = score_rollouts(
            model, rollouts, self.path("scores"), pad_id=tokenizer.pad_token_id,
            batch_size=self.cfg.scoring.batch_size, top_k=self.cfg.scoring.top_k,
            chunk_size=self.cfg.scoring.chunk_size, entropy_temperature=self.cfg.entropy_temperature,
            progress=self.progress,
        )
        summary.pop("seconds")
        entropy = self._scored_entropy()
        summary.update({
            "tokens": int(entropy.numel()),
            "entropy_median": float(entropy.median()),
            "entropy_p90": float(entropy.quantile(0.9)),
            **self._share_above_tau(entropy),
        })
        return summary

    def _scored_entropy(self) -> Any:
        """(T,) the base entropy of every scored completion token, all rollouts concatenated."""
        import torch

        from ..stages.scoring import load_scores

        return torch.cat([s["entropy"] for s in load_scores(self.path("scores"), keys=("entropy",)).values()])

    def _share_above_tau(self, entropy: Any) -> dict[str, float]:
        """The scoring summary's gate statistic, with the tau it was taken at.

        ``gate.tau`` is not in the scoring fingerprint (changing it must not redo the
        scoring), so the share is stored beside its tau and re-taken when a skipped stage
        finds another tau (:meth:`_run_stage`).
        """
        tau = self.cfg.gate.tau
        return {"share_above_tau": float((entropy > tau).float().mean()), "share_tau": tau}

    def stage_selection(self) -> dict[str, Any]:
        from ..stages.selection import select_rollouts

        rows, summary = select_rollouts(self.rollouts(), self.cfg.selection)
        if dist.is_main():
            write_jsonl(self.path("selection.jsonl"), rows)
        return summary

    def stage_training(self) -> dict[str, Any]:
        if self.cfg.method != "offline":
            return self._train_sampling()
        from ..stages.scoring import LazyScores
        from ..training.trainer import build_trainer, train_adapter

        model, tokenizer = self.model_and_tokenizer()
        # The eval section is not in the training fingerprint: it changes what is logged, not the adapter.
        heldout = self.problems("heldout")[: self.cfg.eval.during_training_problems] if self.cfg.eval.every_steps else None
        trainer = build_trainer(
            self.cfg, model, tokenizer, self.rollouts(), read_jsonl_cut_torn_tail(self.path("selection.jsonl")),
            # Each process reads the scores of the rollouts its data loader gives it, when it gets them.
            LazyScores(self.path("scores")), self.path("checkpoints"),
            report_to=self.tracker.trainer_report_to if self.tracker else "none",
            entropy_temperature=self.cfg.entropy_temperature, progress=self.progress, heldout=heldout,
        )
        start = time.perf_counter()
        summary = train_adapter(trainer, self.run_dir, self.cfg)
        if dist.is_main():
            write_offline_compute(self.run_dir, self.cfg, base_parameter_count(model),
                                  train_seconds=time.perf_counter() - start, final_step=summary["steps"],
                                  trained_tokens=summary["trained_tokens"])
        return summary

    def _train_sampling(self) -> dict[str, Any]:
        """Method grpo/online: the trainer samples the training problems itself."""
        from ..training.grpo import build_grpo_trainer, train_grpo

        model, tokenizer = self.model_and_tokenizer()
        heldout = self.problems("heldout")[: self.cfg.eval.during_training_problems] if self.cfg.eval.every_steps else None
        trainer = build_grpo_trainer(
            self.cfg, model, tokenizer, self.problems("train"), self.run_dir,
            report_to=self.tracker.trainer_report_to if self.tracker else "none", progress=self.progress,
            heldout=heldout, reward=self._reward,
        )
        return train_grpo(trainer, self.run_dir, self.cfg)


COMPUTE_FILE = "compute.json"
UPFRONT_STAGES = ("problems", "rollouts", "scoring", "selection")


def _sequence_tokens(rollouts_path: Path) -> int:
    """Prompt + completion positions of every rollout."""
    return sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in read_jsonl_cut_torn_tail(rollouts_path))


def offline_compute(run_dir: Path, cfg: Config, n_params: int, *, train_seconds: float, final_step: int,
                    trained_tokens: int) -> dict[str, Any]:
    """What an offline run spent, cumulative from its start, at each checkpoint and in total.

    Up front (charged before the first step): the rollouts (every prompt and completion
    position of every sample, prefill included) and scoring (one teacher-forced base pass
    over the same positions) as forward tokens, with the measured seconds of the problems,
    rollouts, scoring and selection stages (``stages/*.json``). Training: the positions
    that went through a step's forward and backward, as the Trainer counted them
    (``num_input_tokens_seen``, non-padding, in each checkpoint's ``trainer_state.json``);
    ``loss.kl_anchor: exact`` adds one adapter-disabled forward of the same positions, and
    ``loss.kl_on_prompt`` one more. A checkpoint's training seconds are the training
    stage's seconds apportioned by step (the Trainer records no time per step).
    """
    sequence_tokens = _sequence_tokens(run_dir / "rollouts.jsonl")
    upfront_seconds = sum(float((read_json(p) if (p := run_dir / "stages" / f"{s}.json").exists() else {})
                                .get("seconds", 0.0)) for s in UPFRONT_STAGES)
    reference_passes = int(cfg.loss.kl_anchor == "exact") + int(cfg.loss.kl_on_prompt)

    def at(step: int, trained: int) -> dict[str, Any]:
        ledger = ComputeLedger(n_params)
        ledger.add(forward_tokens=2 * sequence_tokens, wall_seconds=upfront_seconds)  # rollouts + scoring
        ledger.add(forward_tokens=reference_passes * trained, trained_tokens=trained,
                   wall_seconds=train_seconds * step / final_step if final_step else 0.0)
        return {k: v for k, v in ledger.to_dict().items() if k != "n_params"}

    checkpoints = []
    for state_file in sorted((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                             key=lambda p: int(p.parent.name.rsplit("-", 1)[-1])):
        state = read_json(state_file)
        if "num_input_tokens_seen" in state and state.get("global_step"):
            step = int(state["global_step"])
            checkpoints.append({"step": step, **at(step, int(state["num_input_tokens_seen"]))})
    return {"n_params": int(n_params), "method": "offline", "checkpoints": checkpoints,
            "total": at(final_step, trained_tokens),
            "counted": "forward: rollouts and scoring (prompt + completion positions); trained: the Trainer's "
                       "num_input_tokens_seen (non-padding positions through forward and backward)"}


def write_offline_compute(run_dir: Path, cfg: Config, n_params: int, **kwargs: Any) -> dict[str, Any]:
    record = offline_compute(run_dir, cfg, n_params, **kwargs)
    atomic_write_json(run_dir / COMPUTE_FILE, record)
    return record

def _config_diff(old: dict[str, Any], new: dict[str, Any], *, show: int = 3) -> str:
    """``a.b: old -> new`` for the first ``show`` keys whose values differ."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(old), flat(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if not keys:
        return "settings that are not in its config.yaml"
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:show])
    return shown + (f" and {len(keys) - show} more" if len(keys) > show else "")


def summary_table(results: list[StageResult]) -> str:
    return "\n".join(r.line() for r in results)


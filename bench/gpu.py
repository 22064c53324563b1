"""The GPU check: one command, one H100-class GPU, at most 8 minutes, figures as `name=value` lines.

    PYTHONPATH=src python bench/gpu.py                      # everything, on cuda
    PYTHONPATH=src python bench/gpu.py --sections kernels,e2e
    PYTHONPATH=src python bench/gpu.py --smoke              # the same code on CPU at tiny sizes (< 2 min)

Sections (each with its own time budget on a GPU; when a section runs past it, its remaining
measurements are skipped and named in `skipped`; the CPU smoke run has no budgets; a failure
is recorded, not raised):

  env       versions, device name, bf16 support.
  kernels   the fused kernels in bf16 against fp32 references on the device, as relative
            errors ||got - ref|| / ||ref||: policy_logprobs (log p, top-k log p, logsumexp and
            their gradient), policy_logprobs_and_kl (KL and its gradient), token_entropy and
            token_stats (scoring's entropy, log p, top-k).
  step      a plain LoRA step against the gated steps with the cached and the exact anchor
            (bench/step.py's step_kinds), Qwen2.5-0.5B and -1.5B shapes and Qwen2.5-7B's with 8
            of its 28 layers (vocabulary and head whole), T = 4096 and 8192
            tokens (one sequence): median seconds, peak CUDA memory (max_memory_allocated)
            per kind, and the ratios; gpu_cached_ratio / gpu_exact_ratio are those of the
            largest configuration that ran (named by gpu_ratio_config).
  scoring   score_batch (teacher-forced base pass, top-64 cache) tokens per second.
  rollouts  the fast backend against one model.generate call, batch 64 (16 prompts x 4
            samples), tokens per second, and the device syncs per decoded token of the fast
            loop as torch.cuda.set_sync_debug_mode counts them (model internals included).
  e2e       every stage of a tiny run (build_tiny_model_dir, tiny_run_args) with
            --model.device cuda, then eval: pass/fail per stage.

The models are the real architectures and vocabulary (Qwen2Config with Qwen2.5-0.5B's and
-1.5B's sizes, and 7B's layers, heads and head with 8 of its 28 layers; vocab 151,936, tied
embeddings: the real 7B's are untied, which changes no step's time), randomly initialised in
bf16: no hub access is needed. A random model almost never samples EOS, so rollouts run to
max_new_tokens (the fast backend's row dropping is not exercised; its per-step cost is).
Figures go to stdout as they are measured and to a JSON file (--json; default
$OUT/gpu.json when OUT is set, else gpu.json), rewritten after every section.

Running it on the GPU machine (torch 2.11, transformers 5.17, accelerate, peft; no trl; no
package registry, no hub). First see what that image lacks of what the project imports at
run time (trl and its requirements, math-verify for the rewards, wandb for tracking):

    python -c "import importlib.util as u; print([m for m in ('trl', 'datasets', 'math_verify',
        'latex2sympy2_extended', 'antlr4', 'wandb', 'gguf', 'pyarrow', 'pandas', 'dill', 'multiprocess',
        'xxhash', 'fsspec', 'psutil', 'jinja2', 'safetensors', 'yaml', 'tqdm') if u.find_spec(m) is None])"

Then download those wheels here, without their dependencies, at the versions this project
is tested with, e.g. for an image that has none of them:

    pip download trl==1.16.0 datasets==5.2.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
        antlr4-python3-runtime==4.13.2 wandb==0.31.0 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19 \
        xxhash==4.1.0 --no-deps -d wheels/

(trl 1.16.0 itself requires accelerate>=1.10.1, datasets>=4.7.0, huggingface_hub>=0.34.0, jinja2,
numpy>=1.26.0, packaging>20.0, pandas>=2.1.1, psutil>=5.9.4, pyarrow>=21.0.0, pyyaml>=6.0.1,
transformers>=4.56.2; add whichever of those the probe names. For compiled wheels (xxhash,
wandb, pyarrow, pandas, psutil) add `--only-binary=:all: --platform manylinux2014_x86_64
--python-version X.Y` with that machine's Python when it differs from this one's.) Copy
wheels/ along, and there:

    pip install --no-index --no-deps wheels/*.whl
    PYTHONPATH=src python bench/gpu.py          # figures on stdout, JSON in $OUT/gpu.json

The project pins transformers>=5.24 in pyproject.toml, so `pip install -e .` would try to
upgrade transformers there (and fail without a registry): run it from the checkout with
PYTHONPATH=src (or `pip install --no-deps -e .`). The e2e section's training stage is where
trl is needed; the other sections need only torch, transformers, peft and safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from shapes import QWEN, QWEN_VOCAB, random_qwen  # noqa: E402  (bench/shapes.py)

SECTIONS = ("env", "kernels", "step", "scoring", "rollouts", "e2e")
BUDGET_S = {"env": 10, "kernels": 45, "step": 180, "scoring": 45, "rollouts": 120, "e2e": 70}  # 470 s in all

SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128)


@dataclass
class Plan:
    """Sizes of every measurement: the GPU run's or the smoke run's (same code, same keys per label)."""

    device: str
    vocab: int
    models: dict[str, dict[str, int]]
    step_lengths: tuple[int, ...]  # tokens per sequence (prompt + completion), batch 1
    step_reps: int
    kernel_rows: tuple[int, int]  # (B, C) of the kernel check
    scoring_batch: tuple[int, int, int]  # rollouts, prompt length, completion length
    rollout_prompts: int = 16
    rollout_samples: int = 4
    rollout_new_tokens: int = 256
    reps: int = 2
    e2e_device: str = "cuda"

    @staticmethod
    def gpu() -> "Plan":
        return Plan(device="cuda", vocab=QWEN_VOCAB, models=QWEN, step_lengths=(4096, 8192), step_reps=3,
                    kernel_rows=(2, 1024), scoring_batch=(8, 128, 1024))

    @staticmethod
    def smoke() -> "Plan":
        return Plan(device="cpu", vocab=1000, models={label: SMOKE_SHAPE for label in QWEN}, step_lengths=(64, 96),
                    step_reps=1, kernel_rows=(2, 16), scoring_batch=(2, 8, 16), rollout_prompts=4,
                    rollout_samples=2, rollout_new_tokens=8, reps=1, e2e_device="cpu")


def expected_keys(plan: Plan, sections: tuple[str, ...] = SECTIONS) -> list[str]:
    """Every figure a complete run of ``sections`` prints (the smoke test checks them all)."""
    keys = [f"section_{s}" for s in sections] + [f"section_{s}_seconds" for s in sections]
    if "env" in sections:
        keys += ["env_torch", "env_transformers", "env_peft", "env_trl", "env_device_name", "env_bf16"]
    if "kernels" in sections:
        keys += [f"kernels_{name}_rel_err" for name in KERNEL_FIGURES]
    if "step" in sections:
        for label in plan.models:
            for length in plan.step_lengths:
                prefix = f"step_{label}_T{length}"
                keys += [f"{prefix}_{kind}_{what}" for kind in ("plain", "cached", "exact") for what in ("s", "peak_gib")]
                keys += [f"{prefix}_cached_ratio", f"{prefix}_exact_ratio"]
        keys += ["gpu_cached_ratio", "gpu_exact_ratio", "gpu_ratio_config"]
    if "scoring" in sections:
        keys += [f"scoring_{label}_tokens_per_s" for label in plan.models]
    if "rollouts" in sections:
        label = next(iter(plan.models))
        keys += [f"rollouts_{label}_{who}_tokens_per_s" for who in ("fast", "hf")]
        keys += [f"rollouts_{label}_fast_vs_hf", f"rollouts_{label}_fast_syncs_per_token",
                 f"rollouts_{label}_eos_share"]
    if "e2e" in sections:
        keys += [f"e2e_{stage}" for stage in E2E_STAGES]
    return keys


class Report:
    """Figures printed as ``name=value`` when recorded, and the JSON written after each section."""

    def __init__(self, json_path: Path):
        self.json_path = json_path
        self.figures: dict[str, Any] = {}
        self.sections: dict[str, dict[str, Any]] = {}
        self.skipped: list[str] = []

    def put(self, name: str, value: Any) -> None:
        if isinstance(value, float):
            value = round(value, 6) if value == value else None  # NaN (not measurable here) -> null
        self.figures[name] = value
        print(f"{name}={'n/a' if value is None else value}", flush=True)

    def write(self) -> None:
        data = {"figures": self.figures, "sections": self.sections, "skipped": self.skipped}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(data, indent=2))


class Budget:
    """A section's time budget: measurements check ``spent()`` before they start."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(plan: Plan, label: str, *, sharpen: float = 1.0) -> tuple[Any, Any]:
    """A randomly initialised Qwen2 model of ``label``'s shape in bf16 on the plan's device, and a tokenizer."""
    return random_qwen(plan.models[label], vocab=plan.vocab, device=plan.device, dtype=torch.bfloat16,
                       sharpen=sharpen)


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------


def section_env(plan: Plan, report: Report, budget: Budget) -> None:
    import importlib.metadata as md

    for package in ("torch", "transformers", "peft", "trl"):
        try:
            report.put(f"env_{package}", md.version(package))
        except md.PackageNotFoundError:
            report.put(f"env_{package}", "missing")
    cuda = plan.device == "cuda"
    report.put("env_device_name", torch.cuda.get_device_name() if cuda else "cpu")
    report.put("env_bf16", bool(torch.cuda.is_bf16_supported()) if cuda else False)


KERNEL_FIGURES = ("logprobs_logp", "logprobs_topk_logp", "logprobs_lse", "logprobs_grad", "kl_value", "kl_logp",
                  "kl_grad", "entropy_t0.6", "stats_entropy", "stats_logp", "stats_topk_logp")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def section_kernels(plan: Plan, report: Report, budget: Budget) -> None:
    from reasonmaxxer.core.entropy import token_entropy, token_stats
    from reasonmaxxer.core.logprobs import policy_logprobs, policy_logprobs_and_kl

    B, C = plan.kernel_rows
    V, K = plan.vocab, 64
    gen = torch.Generator(device=plan.device).manual_seed(0)
    logits = (torch.randn(B, C, V, device=plan.device, generator=gen) * 3).bfloat16()
    base = (logits.float() + torch.randn(B, C, V, device=plan.device, generator=gen) * 0.5).bfloat16()
    targets = torch.randint(0, V, (B, C), device=plan.device, generator=gen)
    topk_ids = torch.randint(0, V, (B, C, K), device=plan.device, generator=gen)
    w_logp, w_lse, w_kl = (torch.randn(B, C, device=plan.device, generator=gen) for _ in range(3))
    w_topk = torch.randn(B, C, K, device=plan.device, generator=gen)

    def reference(z: torch.Tensor, with_kl: bool) -> tuple[torch.Tensor, ...]:
        """The naive fp32 computation: a full log-softmax, gathered."""
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        topk = logp_all.gather(-1, topk_ids)
        lse = torch.logsumexp(z, -1)
        kl = None
        if with_kl:
            base_logp = torch.log_softmax(base.float(), -1)
            kl = (base_logp.exp() * (base_logp - logp_all)).sum(-1)
        return logp, topk, lse, kl

    def objective(logp, topk, lse, kl) -> torch.Tensor:
        total = (w_logp * logp).sum() + (w_topk * topk).sum() + (w_lse * lse).sum()
        return total + (w_kl * kl).sum() if kl is not None else total

    for with_kl in (False, True):
        z = logits.clone().requires_grad_(True)
        if with_kl:
            got = policy_logprobs_and_kl(z, targets, base, topk_ids)
        else:
            got = (*policy_logprobs(z, targets, topk_ids), None)
        objective(*got).backward()
        z_ref = logits.float().requires_grad_(True)
        ref = reference(z_ref, with_kl)
        objective(*ref).backward()
        if with_kl:
            report.put("kernels_kl_value_rel_err", _rel(got[3], ref[3]))
            report.put("kernels_kl_logp_rel_err", _rel(got[0], ref[0]))
            report.put("kernels_kl_grad_rel_err", _rel(z.grad, z_ref.grad))
        else:
            for i, name in enumerate(("logp", "topk_logp", "lse")):
                report.put(f"kernels_logprobs_{name}_rel_err", _rel(got[i], ref[i]))
            report.put("kernels_logprobs_grad_rel_err", _rel(z.grad, z_ref.grad))
        del z, z_ref, got, ref
        _free()

    with torch.no_grad():
        ref_z = logits.float() / 0.6
        ref_entropy = -(torch.softmax(ref_z, -1) * torch.log_softmax(ref_z, -1)).sum(-1)
        report.put("kernels_entropy_t0.6_rel_err", _rel(token_entropy(logits, temperature=0.6), ref_entropy))
        stats = token_stats(logits, targets, top_k=K, entropy_temperature=0.6)
        logp_all = torch.log_softmax(logits.float(), -1)
        report.put("kernels_stats_entropy_rel_err", _rel(stats["entropy"], ref_entropy))
        report.put("kernels_stats_logp_rel_err",
                   _rel(stats["logp"], logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)))
        report.put("kernels_stats_topk_logp_rel_err", _rel(stats["topk_logp"], logp_all.topk(K, -1).values))


def section_step(plan: Plan, report: Report, budget: Budget) -> None:
    from step import step_kinds  # bench/step.py

    device = torch.device(plan.device)
    done: list[tuple[str, int]] = []
    for label in plan.models:
        for length in plan.step_lengths:
            prefix = f"step_{label}_T{length}"
            if budget.spent():
                report.skipped.append(prefix)
                continue
            try:
                _step_config(plan, report, label, length, prefix, device, step_kinds)
                done.append((label, length))
            except torch.cuda.OutOfMemoryError as exc:
                report.put(f"{prefix}_error", f"out of memory: {str(exc).splitlines()[0][:200]}")
            finally:
                _free()
    if done:
        label, length = done[-1]
        prefix = f"step_{label}_T{length}"
        report.put("gpu_cached_ratio", report.figures[f"{prefix}_cached_ratio"])
        report.put("gpu_exact_ratio", report.figures[f"{prefix}_exact_ratio"])
        report.put("gpu_ratio_config", f"{label}_T{length}")


def _step_config(plan: Plan, report: Report, label: str, length: int, prefix: str, device: torch.device,
                 step_kinds: Callable[..., dict[str, Callable[[], None]]]) -> None:
    model, tokenizer = build_model(plan, label)
    prompt_len = min(128, length // 4)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = step_kinds(model, tokenizer, Path(tmp), batch=1, prompt_len=prompt_len,
                           completion_len=length - prompt_len, top_k=64)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        peaks: dict[str, float] = {k: float("nan") for k in kinds}
        for rep in range(plan.step_reps + 1):  # the first repetition warms up and is not counted
            for name, step in kinds.items():
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()
                _sync(device)
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    peaks[name] = peak if peaks[name] != peaks[name] else max(peaks[name], peak)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for name in kinds:
            report.put(f"{prefix}_{name}_s", medians[name])
            report.put(f"{prefix}_{name}_peak_gib", peaks[name])
        report.put(f"{prefix}_cached_ratio", medians["cached"] / medians["plain"])
        report.put(f"{prefix}_exact_ratio", medians["exact"] / medians["plain"])
        del kinds, model


def section_scoring(plan: Plan, report: Report, budget: Budget) -> None:
    from reasonmaxxer.stages.scoring import score_batch
    from reasonmaxxer.utils.sequences import pack_batch

    n, prompt_len, completion_len = plan.scoring_batch
    device = torch.device(plan.device)
    for label in plan.models:
        if budget.spent():
            report.skipped.append(f"scoring_{label}")
            continue
        model, tokenizer = build_model(plan, label)
        gen = torch.Generator().manual_seed(1)
        packed = pack_batch([torch.randint(3, plan.vocab, (prompt_len,), generator=gen).tolist() for _ in range(n)],
                            [torch.randint(3, plan.vocab, (completion_len,), generator=gen).tolist()
                             for _ in range(n)], tokenizer.pad_token_id)
        packed = {k: v.to(device) for k, v in packed.items()}
        rates = []
        for rep in range(plan.reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            score_batch(model, packed, top_k=64, chunk_size=128, entropy_temperature=0.6)
            _sync(device)
            if rep > 0:
                rates.append(n * completion_len / (time.perf_counter() - t0))
        report.put(f"scoring_{label}_tokens_per_s", statistics.median(rates))
        del model, packed
        _free()


def section_rollouts(plan: Plan, report: Report, budget: Budget) -> None:
    import dataclasses

    from reasonmaxxer.config.schema import RolloutConfig
    from reasonmaxxer.stages.sampling import eos_token_ids, fast_generate, generate_batch

    label = next(iter(plan.models))  # the 0.5B shape: decoding is bound by per-step overheads, not size
    model, tokenizer = build_model(plan, label, sharpen=20.0)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(300, plan.vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(32, 96, (plan.rollout_prompts,), generator=gen)]
    cfg = RolloutConfig(num_samples=plan.rollout_samples, max_new_tokens=plan.rollout_new_tokens, temperature=0.6,
                        top_p=0.95, batch_size=plan.rollout_prompts * plan.rollout_samples)
    eos = eos_token_ids(model, tokenizer)
    rates: dict[str, list[float]] = {"fast": [], "hf": []}
    finishes: list[str] = []
    for rep in range(plan.reps + 1):  # the first round warms up
        for backend in ("fast", "hf"):
            if rep > 0 and budget.spent():
                report.skipped.append(f"rollouts_{backend}_rep{rep}")
                continue
            t0 = time.perf_counter()
            out = generate_batch(model, tokenizer, prompts, dataclasses.replace(cfg, backend=backend), eos, seed=rep)
            seconds = time.perf_counter() - t0
            if rep > 0:
                rates[backend].append(sum(len(t) for rows in out for t, _ in rows) / seconds)
                finishes += [f for rows in out for _, f in rows]
    for backend in rates:
        report.put(f"rollouts_{label}_{backend}_tokens_per_s", statistics.median(rates[backend]))
    report.put(f"rollouts_{label}_fast_vs_hf", statistics.median(rates["fast"]) / statistics.median(rates["hf"]))
    report.put(f"rollouts_{label}_eos_share", finishes.count("eos") / max(1, len(finishes)))
    syncs = float("nan")
    if plan.device == "cuda":  # every device sync of one fast call, per decoded step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fast_generate(model, prompts, cfg, eos, tokenizer.pad_token_id, seed=0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / cfg.max_new_tokens
    report.put(f"rollouts_{label}_fast_syncs_per_token", syncs)
    del model
    _free()


E2E_STAGES = ("problems", "rollouts", "scoring", "selection", "training", "eval")

# A random tiny model solves nothing, and selection needs problems with both outcomes: this
# reward calls every other sample of a problem correct (its samples are consecutive).
ALTERNATING_REWARD = """
def alternate(prompts, completions, completion_ids, **kwargs):
    return [float(i % 2 == 0) for i in range(len(completions))]
"""


def section_e2e(plan: Plan, report: Report, budget: Budget) -> None:
    from reasonmaxxer.cli import eval_main, train_main
    from reasonmaxxer.testing import build_tiny_model_dir, tiny_run_args

    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "tiny")
        run = Path(tmp) / "run"
        (Path(tmp) / "gpu_bench_reward.py").write_text(ALTERNATING_REWARD)
        sys.path.insert(0, tmp)
        failed = False
        for stage in E2E_STAGES:
            if failed or budget.spent():
                report.put(f"e2e_{stage}", "skipped")
                continue
            args = tiny_run_args(model_dir, run, "--model.device", plan.e2e_device,
                                 "--reward.function", "gpu_bench_reward:alternate")
            if stage == "eval":
                args[args.index("--output_dir")] = "--run_dir"
                args += ["--eval.num_samples", "2", "--eval.movement_rollouts", "6", "--eval.bootstrap", "200"]
            else:
                args += ["--stage", stage]
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    code = (eval_main if stage == "eval" else train_main)(args)
                if code != 0:
                    errors[stage] = f"exit {code}: {stderr.getvalue().strip()[-500:]}"
            except Exception as exc:  # noqa: BLE001 - a device bug is a finding, not a crash
                errors[stage] = "".join(traceback.format_exception_only(exc)).strip()[-500:]
            failed = stage in errors
            report.put(f"e2e_{stage}", "fail" if failed else "pass")
        sys.path.remove(tmp)
    report.sections["e2e"]["stage_errors"] = errors
    if errors:
        raise RuntimeError(f"e2e stages failed: {', '.join(errors)} (errors in the JSON: sections.e2e.stage_errors)")


RUNNERS: dict[str, Callable[[Plan, Report, Budget], None]] = {
    "env": section_env, "kernels": section_kernels, "step": section_step, "scoring": section_scoring,
    "rollouts": section_rollouts, "e2e": section_e2e,
}


def run(plan: Plan, sections: tuple[str, ...], report: Report) -> None:
    for name in sections:
        # The budgets keep the GPU run within its 8 minutes. The smoke run exists to run every
        # measurement's code, so it measures everything however slow the CPU is (a loaded CI
        # machine once ran its step section past 180 s and skipped figures).
        seconds = math.inf if plan.device == "cpu" else BUDGET_S[name]
        report.sections[name] = {"budget_s": BUDGET_S[name] if math.isfinite(seconds) else None}
        budget = Budget(seconds)
        try:
            RUNNERS[name](plan, report, budget)
            status, error = "pass", None
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next section
            status = "fail"
            error = "".join(traceback.format_exception(exc))[-3000:]
            print(error, file=sys.stderr, flush=True)
        seconds = time.perf_counter() - budget.start
        report.sections[name].update({"status": status, "seconds": round(seconds, 2), "error": error})
        report.put(f"section_{name}", status)
        report.put(f"section_{name}_seconds", round(seconds, 2))
        _free()
        report.write()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    default_json = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu.json")
    ap.add_argument("--json", type=Path, default=default_json, help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: --sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    plan = Plan.smoke() if args.smoke else Plan.gpu()
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    report = Report(args.json)
    start = time.perf_counter()
    run(plan, sections, report)
    report.put("total_seconds", round(time.perf_counter() - start, 2))
    report.write()
    print(f"json={args.json}")
    return 0 if all(s["status"] == "pass" for s in report.sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Gate ablations from one W&B sweep file, run locally or by ``wandb agent``.

The file is W&B's own format (``method``, ``metric``, ``parameters``, ``command``);
parameter names are dotted config keys (``gate.tau``), which W&B passes to train.py as
``--gate.tau=1.4``. Locally, ``train.py --config C --sweep S`` expands the grid as W&B
does, computes problems/rollouts/scoring/selection once in the config's output_dir, and
trains and evaluates each point in its own folder, reusing those stages; a killed sweep
resumes at the first unfinished point.

``seed`` may be a parameter. It seeds everything (problems, rollouts, training, eval
sampling), so each seed has its own shared stages: the config's own seed in output_dir,
any other seed in ``output_dir/seeds/seed=<s>/``, each computed once and linked by that
seed's points. Points that differ only in seed are aggregated in ablation.{json,md,png}
(:mod:`reasonmaxxer.evaluation.ablation`). The held-out problems differ between seeds too (the
builtin generator draws them from the seed); that is fine, since each seed's Δpass@1 is
paired within that seed and the bootstrap resamples problems within each seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import Config, load_config, read_yaml
from ..errors import ConfigError
from ..utils.lock import hold_folder
from ..utils.storage import atomic_write_json, read_json
from .shared import SHARED_STAGES, link_shared_stages, run_shared_stages

logger = logging.getLogger(__name__)

GRID_KINDS = ("values", "value", "int_uniform", "q_uniform")
SEED_PARAMETER = "seed"


@dataclasses.dataclass
class SweepSpec:
    path: Path
    name: str
    method: str
    parameters: dict[str, dict[str, Any]]
    metric: dict[str, Any] | None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a W&B sweep file (structure only; keys are checked by :func:`sweep_configs`)."""
    p = Path(path)
    raw = read_yaml(p)
    where = f"sweep file '{p}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with 'method' and 'parameters'")
    method = raw.get("method")
    if method != "grid":
        raise ConfigError(f"{where}: method {method!r} cannot run locally; use method: grid "
                          "(random/bayes sweeps run with `wandb sweep` + `wandb agent`)")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: 'parameters' must be a non-empty mapping of config keys")
    for name, spec in params.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: parameter '{name}' must be a mapping like {{values: [...]}}")
        if "values" in spec:
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise ConfigError(f"{where}: parameter '{name}': 'values' must be a non-empty list")
        elif "value" in spec:
            pass
        elif {"min", "max"} <= set(spec) and all(isinstance(spec[k], int) for k in ("min", "max")) and "q" not in spec:
            pass  # int_uniform
        elif {"min", "max", "q"} <= set(spec):
            pass  # q_uniform
        else:
            raise ConfigError(f"{where}: parameter '{name}' is not usable in a grid "
                              "(give values, value, integer min/max, or min/max/q)")
    name = str(raw.get("name") or p.stem)
    return SweepSpec(path=p, name=re.sub(r"[^A-Za-z0-9_.-]+", "-", name), method=method, parameters=params,
                     metric=raw.get("metric"))


def _values(spec: dict[str, Any]) -> list[Any]:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if "q" in spec:
        return np.arange(spec["min"], spec["max"], spec["q"]).tolist()
    return list(range(spec["min"], spec["max"] + 1))


def expand_grid(parameters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point of the grid, in the order W&B's grid search proposes them.

    W&B sorts parameters by name, turns int_uniform into min..max and q_uniform into
    arange(min, max, q), keeps constants, and walks the Cartesian product (the last
    name varies fastest).
    """
    names = sorted(parameters)
    return [dict(zip(names, combo)) for combo in itertools.product(*(_values(parameters[n]) for n in names))]


def point_args(point: dict[str, Any]) -> list[str]:
    """The point as W&B's ``${args}`` passes it: ``--key=value``."""
    return [f"--{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"
            for k, v in point.items()]


def point_slug(point: dict[str, Any]) -> str:
    text = ",".join(f"{k}={v}" for k, v in sorted(point.items()))
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text)[:180]


def constant_parameters(spec: SweepSpec) -> dict[str, Any]:
    """The parameters that take one value in every point (``value:``), seed excepted."""
    return {name: values[0] for name, p in spec.parameters.items()
            if name != SEED_PARAMETER and len(values := _values(p)) == 1}


def sweep_configs(config_path: str | None, overrides: list[str], spec: SweepSpec) -> list[tuple[dict[str, Any], Config]]:
    """Each grid point with its full config; any bad parameter fails here, before any work."""
    out = []
    for point in expand_grid(spec.parameters):
        try:
            cfg = load_config(config_path, [*overrides, *point_args(point)])
        except ConfigError as err:
            raise ConfigError(f"sweep file '{spec.path}': {err}") from None
        out.append((point, cfg))
    return out


# ----------------------------------------------------------------------------- shared stages


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock, so that parallel agents compute the shared stages once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shared_dir_for(base_dir: Path, base_seed: int, seed: int) -> Path:
    """Where the shared stages of the points with this seed live (the base folder for the config's own seed)."""
    return base_dir if seed == base_seed else base_dir / "seeds" / f"seed={seed}"


def shared_stage_configs(config_path: str | None, overrides: list[str], spec: SweepSpec,
                         points: list[tuple[dict[str, Any], Config]]) -> dict[int, Config]:
    """Per seed of the sweep (grid order), the config its shared stages run with, in its shared folder.

    That is the base config with the sweep's constant parameters and that seed, so a
    sweep that fixes e.g. ``rollout.num_samples`` shares stages made with it.
    """
    base_cfg = load_config(config_path, overrides)
    constants = point_args(constant_parameters(spec))
    out: dict[int, Config] = {}
    for _, cfg in points:
        if cfg.seed not in out:
            shared = load_config(config_path, [*overrides, *constants, f"--seed={cfg.seed}"])
            shared.output_dir = str(shared_dir_for(Path(base_cfg.output_dir), base_cfg.seed, cfg.seed))
            out[cfg.seed] = shared
    return out


def agent_shared_dir(config_path: str | None, overrides: list[str], cfg: Config) -> Path:
    """Under ``wandb agent``: the shared folder of this point's seed (the agent passes ``--seed=S``)."""
    base_seed = load_config(config_path, _without_seed(overrides)).seed
    return shared_dir_for(Path(cfg.output_dir), base_seed, cfg.seed)


def _without_seed(overrides: list[str]) -> list[str]:
    out, skip_value = [], False
    for arg in overrides:
        if skip_value:
            skip_value = False
        elif arg == f"--{SEED_PARAMETER}":
            skip_value = True
        elif not arg.startswith(f"--{SEED_PARAMETER}="):
            out.append(arg)
    return out


def ensure_shared_stages(base_cfg: Config, progress: bool, *, tracked: bool = True) -> None:
    """Run problems -> selection once in the base run folder (no-op when they are done).

    Parallel agents wait for each other here; the base folder is held (:func:`hold_folder`)
    while its stages run. ``tracked=False`` keeps them out of W&B (under ``wandb agent`` the
    process's one W&B run belongs to the point).
    """
    base_dir = Path(base_cfg.output_dir)
    with _locked(base_dir / ".sweep.lock"), hold_folder(base_dir):
        run_shared_stages(base_cfg, progress, tracked=tracked)


# ----------------------------------------------------------------------------- running


def point_row(point: dict[str, Any], run_dir: Path, movement: dict[str, Any], accuracy: dict[str, Any],
              train_seconds: float, *, seed: int, shared_dir: Path) -> dict[str, Any]:
    log = json.loads((run_dir / "train_log.json").read_text())
    fractions = [h["fork_fraction"] for h in log if "fork_fraction" in h]
    d = accuracy["delta_pass_at_1"]
    return {
        "point": point,
        "seed": seed,
        "run_dir": str(run_dir),
        "shared_dir": str(shared_dir),
        "fork_fraction": float(np.mean(fractions)) if fractions else None,
        "delta_pass_at_1": d["mean"],
        "delta_ci95": d["ci95"],
        "pass_at_1_base": accuracy["base"]["pass_at_1"],
        "pass_at_1_adapter": accuracy["adapter"]["pass_at_1"],
        "kl_ratio": movement["kl_ratio"],
        "kl_mean_all": _kl_mean_all(movement),
        "top1_agreement_nonfork": (movement.get("nonfork") or {}).get("top1_agreement"),
        "train_seconds": train_seconds,
        # What the bootstrap over seeds and problems resamples (ablation.json's groups).
        "per_problem_delta": point_problem_deltas(run_dir, shared_dir),
    }


def point_problem_deltas(run_dir: Path, shared_dir: Path) -> dict[str, float]:
    """Per held-out problem: the adapter's mean reward minus the base's (the eval samples of the point and its seed)."""
    from ..evaluation.accuracy import per_problem_delta, per_problem_rewards
    from ..utils.storage import read_jsonl_cut_torn_tail

    base = read_jsonl_cut_torn_tail(shared_dir / "eval_samples" / "base_samples.jsonl")
    adapter = read_jsonl_cut_torn_tail(run_dir / "eval_samples" / "adapter_samples.jsonl")
    return per_problem_delta(per_problem_rewards(base), per_problem_rewards(adapter))


def _kl_mean_all(movement: dict[str, Any]) -> float | None:
    n_f, n_n = movement["positions"]["fork"], movement["positions"]["nonfork"]
    f = (movement.get("fork") or {}).get("kl_mean") or 0.0
    n = (movement.get("nonfork") or {}).get("kl_mean") or 0.0
    return (f * n_f + n * n_n) / (n_f + n_n) if n_f + n_n else None


def run_point(point: dict[str, Any], cfg: Config, base_dir: Path, progress: bool) -> dict[str, Any]:
    """Train and evaluate one point in its own folder, reusing the stages in ``base_dir``
    (the shared folder of the point's seed, see :func:`shared_dir_for`).

    With tracking on, training and eval log into one W&B run (the sweep's metric lives there).
    """
    from ..evaluation.runner import run_eval
    from ..tracking import Tracker
    from .pipeline import Pipeline

    run_dir = Path(cfg.output_dir)
    with hold_folder(run_dir):  # two agents handed the same point: the second one stops here
        link_shared_stages(base_dir, cfg)
        tracker = Tracker(cfg, run_dir)
        try:
            results = Pipeline(cfg, progress=progress).run(tracker=tracker)
            train_seconds = next(r.seconds for r in results if r.name == "training")
            evaluated = run_eval(cfg, adapter_path=run_dir / "adapter", base_path=cfg.model.name_or_path,
                                 out=run_dir, progress=progress, tracker=tracker,
                                 base_samples_dir=base_dir / "eval_samples")
            row = point_row(point, run_dir, evaluated["movement"], evaluated["accuracy"], train_seconds,
                            seed=cfg.seed, shared_dir=base_dir)
        finally:
            tracker.finish()
    return row


def sweep_plan(config_path: str | None, overrides: list[str], sweep_path: str) -> str:
    """What ``--sweep`` would do, without doing it: each seed's shared folder and each point's, with what is done."""
    from .pipeline import Pipeline

    spec = load_sweep(sweep_path)
    points = sweep_configs(config_path, overrides, spec)
    base_dir = Path(load_config(config_path, overrides).output_dir)
    lines = [f"sweep {spec.name}: {len(points)} points"]
    for seed, cfg in shared_stage_configs(config_path, overrides, spec, points).items():
        pipeline = Pipeline(cfg)
        fps = pipeline.fingerprints()
        done = [st for st in SHARED_STAGES if (state := pipeline.state(st)) is not None and state.get("done")
                and state.get("fingerprint") == fps[st]]
        lines.append(f"  seed {seed}: shared stages in {cfg.output_dir} "
                     f"({', '.join(done) + ' done' if done else 'to run'})")
    trained: dict[str, str] = {}
    for i, (point, cfg) in enumerate(points, 1):
        point_dir = base_dir / "sweeps" / spec.name / point_slug(point)
        key = Pipeline(dataclasses.replace(cfg, output_dir=str(point_dir))).fingerprints()["training"]
        done = point_dir / "point.json"
        status = (f"same run as {trained[key]}" if key in trained
                  else "done" if done.exists() and read_json(done).get("point") == point else "to train and evaluate")
        trained.setdefault(key, point_slug(point))
        lines.append(f"  {i:>3}. {point_dir}: {status}")
    return "\n".join(lines)


def run_sweep(config_path: str | None, overrides: list[str], sweep_path: str, progress: bool = True) -> Path:
    """Run every point of a grid sweep locally; write ablation.{json,md,png} and return its folder."""
    from ..evaluation.ablation import group_over_seeds, paired_differences, write_ablation

    spec = load_sweep(sweep_path)
    points = sweep_configs(config_path, overrides, spec)  # validates every point first
    base_cfg = load_config(config_path, overrides)
    base_dir = Path(base_cfg.output_dir)
    shared = shared_stage_configs(config_path, overrides, spec, points)
    # One process runs the whole sweep: it holds the base folder (and each seed's shared
    # folder) throughout (its points read the shared stages and write the base's eval
    # samples), so agents and other jobs on these folders are refused meanwhile.
    with hold_folder(base_dir), contextlib.ExitStack() as held:
        for cfg in shared.values():
            if Path(cfg.output_dir) != base_dir:
                held.enter_context(hold_folder(cfg.output_dir))
        for seed, cfg in shared.items():
            if len(shared) > 1:
                print(f"\n=== sweep {spec.name}: shared stages of seed {seed} in {cfg.output_dir}", flush=True)
            run_shared_stages(cfg, progress)
        shared_dirs = {seed: Path(cfg.output_dir) for seed, cfg in shared.items()}
        rows = _run_points(spec, points, base_dir, shared_dirs, progress)
        groups = group_over_seeds(rows, resamples=base_cfg.eval.bootstrap, seed=base_cfg.seed)
        paired = paired_differences(rows, resamples=base_cfg.eval.bootstrap, seed=base_cfg.seed)
        sweep_dir = base_dir / "sweeps" / spec.name
        atomic_write_json(sweep_dir / "ablation.json", {"groups": groups, "paired": paired, "points": rows})
        write_ablation(sweep_dir, spec.name, groups, paired)
    if base_cfg.tracking.report_to == "wandb":
        from ..tracking import Tracker

        summary_cfg = dataclasses.replace(base_cfg, tracking=dataclasses.replace(
            base_cfg.tracking, run_name=f"{spec.name}-ablation", group=base_cfg.tracking.group or spec.name))
        tracker = Tracker(summary_cfg, sweep_dir)
        try:
            tracker.log_table("ablation", [{k: v for k, v in g.items() if k != "per_seed"} for g in groups])
            tracker.log_table("ablation_points", [{k: v for k, v in r.items() if k != "per_problem_delta"}
                                                  for r in rows])
        finally:
            tracker.finish()
    return sweep_dir


def _run_points(spec: SweepSpec, points: list[tuple[dict[str, Any], Config]], base_dir: Path,
                shared_dirs: dict[int, Path], progress: bool) -> list[dict[str, Any]]:
    """Train and evaluate every point not done yet; the rows of all of them, in grid order.

    shared_dirs: per seed, the folder holding that seed's shared stages.
    """
    from .pipeline import Pipeline

    sweep_dir = base_dir / "sweeps" / spec.name
    rows = []
    trained: dict[str, dict[str, Any]] = {}  # training fingerprint -> row: identical points train once
    for i, (point, cfg) in enumerate(points, 1):
        point_dir = sweep_dir / point_slug(point)
        cfg.output_dir = str(point_dir)
        key = Pipeline(cfg).fingerprints()["training"]
        if key in trained:  # e.g. gate.mode=all at another tau: the same run
            rows.append({**trained[key], "point": point, "same_as": trained[key]["point"]})
            continue
        done = point_dir / "point.json"
        if done.exists() and read_json(done).get("point") == point:
            rows.append(_complete_row(read_json(done), cfg.seed, shared_dirs[cfg.seed]))
            trained[key] = rows[-1]
            continue
        print(f"\n=== sweep {spec.name}: point {i}/{len(points)}: {point}", flush=True)
        start = time.perf_counter()
        row = run_point(point, cfg, shared_dirs[cfg.seed], progress)
        row["seconds"] = time.perf_counter() - start
        atomic_write_json(done, row)
        rows.append(row)
        trained[key] = row
    return rows


def _complete_row(row: dict[str, Any], seed: int, shared_dir: Path) -> dict[str, Any]:
    """A finished point's row, with the fields older versions did not record filled in from its files."""
    if "seed" not in row:
        row = {**row, "seed": seed, "shared_dir": str(shared_dir)}
    if "per_problem_delta" not in row:
        row = {**row, "per_problem_delta": point_problem_deltas(Path(row["run_dir"]), shared_dir)}
    return row


def agent_run_dir(cfg: Config, overrides: list[str]) -> Path | None:
    """Under ``wandb agent`` (WANDB_SWEEP_ID set), the folder of this point of the sweep."""
    sweep_id = os.environ.get("WANDB_SWEEP_ID")
    if not sweep_id:
        return None
    # The point's parameters: dotted config keys, and seed (a top-level key a sweep may vary).
    dotted = [o for o in overrides if o.startswith("--") and ("." in o.split("=", 1)[0]
                                                             or o.startswith(f"--{SEED_PARAMETER}="))]
    slug = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", ",".join(sorted(o.lstrip("-") for o in dotted)))[:180] or "default"
    return Path(cfg.output_dir) / "sweeps" / re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep_id) / slug


def agent_point_config(base_cfg: Config, point_dir: Path) -> Config:
    """The config a ``wandb agent`` point trains with: its own folder, and W&B tracking on.

    The agent waits for the sweep's metric in the run's summary, so the point logs to W&B
    whatever ``tracking.report_to`` says (the shipped sweeps point at a config with ``none``).
    """
    tracking = base_cfg.tracking
    if tracking.report_to != "wandb":
        logger.info("wandb agent (WANDB_SWEEP_ID=%s): tracking switched on for this point "
                    "(tracking.report_to was '%s'), so its metrics reach the sweep",
                    os.environ.get("WANDB_SWEEP_ID"), tracking.report_to)
        tracking = dataclasses.replace(tracking, report_to="wandb")
    return dataclasses.replace(base_cfg, output_dir=str(point_dir), tracking=tracking)


"""Command-line entry points; ``train.py`` and ``eval.py`` only call into here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .utils import distributed as dist


def _fail(err: UserError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options both entry points share; every other --section.key is a config override.

    The epilog lists every config key (type, default, help) from the schema.
    """
    from .config.reference import config_reference

    text = description + " Any config key can be overridden as --section.key value or --section.key=value."
    parser = argparse.ArgumentParser(prog=prog, description=textwrap.fill(text, width=100),
                                     epilog=config_reference(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) as YAML and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _print_config(cfg) -> int:
    """The resolved config as YAML that ``--config`` reads back to the same config (secrets redacted)."""
    import yaml

    from .tracking import redact

    print(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False), end="")
    return 0


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_model_limits(cfg: Any, *, training: bool) -> None:
    """What the config asks of the model against what it has, before any work: bf16 where the device
    has it, the longest completion within its context, vLLM's tensor parallel size within its heads."""
    import torch

    from .models.limits import check_context, check_precision, check_tensor_parallel
    from .models.loading import local_model_config, resolve_device, resolve_dtype

    device = resolve_device(dist.process_device(cfg.model.device))
    check_precision(resolve_dtype(cfg.model.dtype, device), device)
    if training and cfg.training.get("bf16"):
        check_precision(torch.bfloat16, device, key="training.bf16")
    config = local_model_config(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if config is None:
        return
    name = cfg.model.name_or_path
    check_context(config, longest_prompt=1, max_new_tokens=cfg.rollout.max_new_tokens, model_name=name)
    if cfg.rollout.backend == "vllm":
        check_tensor_parallel(config, size=cfg.rollout.vllm_tensor_parallel_size, model_name=name)


def _print_header(cfg: Any, *, training: bool = True) -> None:
    """The run header: the model, the dtype it runs in here (and why, for ``auto``), the processes
    and how they split the global batch; a launch that asked for more processes than it started.

    Every process checks the batch split (a ConfigError before any work); the main one prints.
    """
    from .config.schema import describe_batch
    from .models.loading import describe_dtype

    batch = f", {describe_batch(cfg.training, dist.world_size())}" if training else ""
    _check_model_limits(cfg, training=training)
    if not dist.is_main():
        return
    n = dist.world_size()
    print(f"ReasonMaxxer: {cfg.model.name_or_path} in {describe_dtype(cfg.model.dtype, cfg.model.device)}, "
          f"{n} process{'es' if n > 1 else ''}{batch}", flush=True)
    lone = dist.asked_for_more_processes()
    if lone:
        print(f"warning: {lone}", file=sys.stderr, flush=True)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python train.py --config FILE [--stage NAME] [--sweep FILE] [--section.key value ...]``.

    Returns the exit status (the ``reasonmaxxer-train`` console script exits with it).
    """
    parser = _parser("train.py", "Run the ReasonMaxxer offline recipe: problems -> rollouts -> scoring -> "
                     "selection -> training.")
    parser.add_argument("--stage", help="run only this stage (its inputs must exist)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo the stages of output_dir that were made with other settings (deletes their outputs)")
    parser.add_argument("--sweep", help="W&B sweep file (method: grid): train and evaluate every point locally")
    parser.add_argument("--compare", help="compare file: train ARMS x SEEDS to one compute budget and evaluate "
                                           "them head to head (compare.md/json/png)")
    parser.add_argument("--plan", action="store_true",
                        help="with --sweep: print each seed's shared folder and each point's folder with what is "
                             "done; with --compare: the arms, seeds, budget, steps and an estimated time; then stop")
    parser.add_argument("--merge", action="store_true",
                        help="after training (finished stages are skipped), write the base with the adapter merged "
                             "in to <output_dir>/merged/ (safetensors + tokenizer, loads without PEFT)")
    args, overrides = parser.parse_known_args(argv)
    _setup_logging()
    try:
        from .config import load_config

        start = time.perf_counter()
        if args.print_config:
            return _print_config(load_config(args.config, overrides))
        if args.merge and (args.sweep or args.compare):
            raise UserError("--merge merges one run's adapter; run it on a sweep point's or arm's folder instead")
        if args.sweep and args.compare:
            raise UserError("--sweep and --compare are two kinds of job; pass one of them")
        if args.compare and (dist.world_size() > 1 or args.stage):
            raise UserError("--compare runs its arms one after another in one process; launch it with "
                            "`python train.py`, without torchrun or --stage")
        if args.compare:
            from .jobs.compare import compare_plan, run_compare

            if args.plan:
                print(compare_plan(args.config, overrides, args.compare))
                return 0
            compare_dir = run_compare(args.config, overrides, args.compare, progress=not args.no_progress)
            print(f"\ncompare finished in {time.perf_counter() - start:.0f} s: {compare_dir}/compare.md")
            print((compare_dir / "compare.md").read_text())
            return 0
        if args.sweep and dist.world_size() > 1:
            raise UserError("--sweep runs its points one after another in one process; launch it with "
                            "`python train.py`, not torchrun (each point can still use every GPU it sees)")
        if args.plan and not args.sweep:
            raise UserError("--plan prints what a sweep or comparison would do; pass it with --sweep FILE or "
                            "--compare FILE")
        if args.sweep and args.plan:
            from .jobs.sweep import sweep_plan

            print(sweep_plan(args.config, overrides, args.sweep))
            return 0
        if args.sweep:
            from .jobs.sweep import run_sweep

            sweep_dir = run_sweep(args.config, overrides, args.sweep, progress=not args.no_progress)
            print(f"\nsweep finished in {time.perf_counter() - start:.0f} s: {sweep_dir}/ablation.md")
            print((sweep_dir / "ablation.md").read_text())
            return 0
        cfg = load_config(args.config, overrides)
        from .jobs.sweep import agent_run_dir

        point_dir = agent_run_dir(cfg, overrides)
        if point_dir is not None and dist.world_size() > 1:
            raise UserError("a `wandb agent` sweep point runs in one process; start the agent without torchrun")
        if point_dir is not None:  # one point of a `wandb agent` sweep: train and evaluate it
            from .jobs.sweep import agent_point_config, agent_shared_dir, ensure_shared_stages, run_point

            shared_dir = agent_shared_dir(args.config, overrides, cfg)  # the folder of this point's seed
            shared_cfg = dataclasses.replace(cfg, output_dir=str(shared_dir))
            ensure_shared_stages(shared_cfg, not args.no_progress, tracked=False)  # the agent's one run is the point's
            row = run_point({}, agent_point_config(cfg, point_dir), shared_dir, not args.no_progress)
            print(f"\nsweep point in {point_dir}: delta pass@1 {row['delta_pass_at_1']}, kl_ratio {row['kl_ratio']}")
            return 0
        from .jobs.pipeline import Pipeline, summary_table
        from .training.export import merge_adapter, trained_adapter_dir
        from .utils.lock import hold_run_folder

        if args.merge and args.stage not in (None, "training"):
            trained_adapter_dir(Path(cfg.output_dir))  # refuse before the stage runs: nothing would be merged
        # Every collective of the run waits at most training.ddp_timeout (a barrier while another process samples).
        dist.init(timeout_s=float(cfg.training.get("ddp_timeout", dist.DEFAULT_TIMEOUT_S)))
        with hold_run_folder(cfg.output_dir):  # one job per folder (a requeued job while the first still runs)
            _print_header(cfg)
            results = Pipeline(cfg, progress=not args.no_progress, overwrite=args.overwrite).run(only=args.stage)
            merged = merge_adapter(cfg, Path(cfg.output_dir)) if args.merge and dist.is_main() else None
    except UserError as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    is_main = dist.is_main()
    dist.close()
    if is_main:
        print(f"\nReasonMaxxer run in {cfg.output_dir} ({time.perf_counter() - start:.1f} s, "
              f"{dist.world_size()} process{'es' if dist.world_size() > 1 else ''})")
        print(summary_table(results))
        if merged is not None:
            print(f"merged model (base + adapter, loads without PEFT): {merged}/")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``python eval.py --config FILE [--adapter PATH] [--base ID_OR_PATH] [--output_dir DIR]``.

    Returns the exit status (the ``reasonmaxxer-eval`` console script exits with it).
    """
    parser = _parser("eval.py", "Measure how far an adapter moved its base at forks vs elsewhere, and whether "
                     "it got better.")
    parser.add_argument("--adapter", help="PEFT adapter folder (default: <output_dir>/adapter)")
    parser.add_argument("--base", help="base model id or folder (default: model.name_or_path)")
    parser.add_argument("--run_dir", help="the trained run's folder (default: the config's output_dir)")
    parser.add_argument("--output_dir", dest="eval_dir",
                        help="where to write the results (default: the run's folder, the config's output_dir)")
    args, overrides = parser.parse_known_args(argv)
    _setup_logging()
    try:
        from .config import load_config

        if args.print_config:
            cfg = load_config(args.config, overrides)
            if args.run_dir:
                cfg.output_dir = args.run_dir
            return _print_config(cfg)
        if dist.world_size() > 1:
            raise UserError("eval.py runs in one process; start it with `python eval.py`, not torchrun")
        cfg = load_config(args.config, overrides)
        if args.run_dir:
            cfg.output_dir = args.run_dir
        from .evaluation.runner import run_eval
        from .utils.lock import EVAL_LOCK_NAME, hold_folder

        run_dir = Path(cfg.output_dir)
        out = Path(args.eval_dir) if args.eval_dir else run_dir
        # Its own lock, not training's: eval beside a running training job is fine (it writes
        # other files), two evals into one folder are not.
        with hold_folder(out, name=EVAL_LOCK_NAME, what=f"eval folder '{out}'"):
            _print_header(cfg, training=False)
            result = run_eval(
                cfg,
                adapter_path=Path(args.adapter) if args.adapter else run_dir / "adapter",
                base_path=args.base or cfg.model.name_or_path,
                out=out,
                progress=not args.no_progress,
            )
    except UserError as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    from .evaluation.report import console_summary

    print(console_summary(result))
    return 0



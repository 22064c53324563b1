"""Command-line entry points; ``train.py`` and ``eval.py`` only call into here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

from .errors import UserError


def _fail(err: UserError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python train.py --config FILE [--stage NAME] [--section.key value ...]``."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Run the ReasonMaxxer offline recipe: problems -> rollouts -> scoring -> selection -> training. "
        "Any config key can be overridden as --section.key value or --section.key=value.",
    )
    parser.add_argument("--config", help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--stage", help="run only this stage (its inputs must exist)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from .config import load_config

        cfg = load_config(args.config, overrides)
        from .pipeline import Pipeline, summary_table

        start = time.perf_counter()
        results = Pipeline(cfg, progress=not args.no_progress).run(only=args.stage)
    except UserError as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(f"\nReasonMaxxer run in {cfg.output_dir} ({time.perf_counter() - start:.1f} s)")
    print(summary_table(results))
    return 0


def main_train() -> None:  # console script
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(train_main())

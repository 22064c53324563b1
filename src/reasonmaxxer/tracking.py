"""Weights & Biases set-up: the resolved config as the run config, offline when it must."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import Config

logger = logging.getLogger(__name__)

# Keys never written to a saved or logged config (exact names or suffixes; not "max_new_tokens").
_SECRET_NAMES = ("api_key", "token", "password", "secret", "credentials")


def _is_secret(key: Any) -> bool:
    k = str(key).lower()
    return any(k == name or k.endswith("_" + name) for name in _SECRET_NAMES)


def redact(obj: Any) -> Any:
    """Drop values whose key names a credential (defence in depth for saved configs)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _is_secret(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or "wandb" in netrc.read_text()
    except OSError:
        return False


class Tracker:
    """A W&B run (or nothing, with ``report_to: none``) shared by every stage."""

    def __init__(self, cfg: Config, run_dir: Path, *, enabled: bool = True):
        self.run = None
        self.report_to = cfg.tracking.report_to
        if self.report_to != "wandb" or not enabled:
            return
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _has_credentials():
            logger.warning("W&B: no credentials found; logging offline to %s/wandb (sync later with `wandb sync`)",
                           run_dir)
            os.environ["WANDB_MODE"] = "offline"
        t = cfg.tracking
        kwargs = dict(project=t.project, entity=t.entity, name=t.run_name or run_dir.name, group=t.group,
                      tags=t.tags or None, config=redact(cfg.to_dict()), dir=str(run_dir))
        sweep_id = os.environ.get("WANDB_SWEEP_ID")
        if sweep_id:  # explicit: wandb reads the environment once per process, at its first setup
            kwargs["settings"] = wandb.Settings(sweep_id=sweep_id)
        try:
            self.run = wandb.init(**kwargs)
        except Exception as err:  # network, auth, server: never crash a run over logging
            logger.warning("W&B: init failed (%s); falling back to offline mode", str(err).splitlines()[0][:200])
            os.environ["WANDB_MODE"] = "offline"
            self.run = wandb.init(**kwargs)

    @property
    def trainer_report_to(self) -> str:
        return "wandb" if self.run is not None else "none"

    def summary(self, prefix: str, values: dict[str, Any]) -> None:
        """Put a stage's summary numbers into the run summary."""
        if self.run is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.run.summary[f"{prefix}/{key}"] = value

    def log_eval(self, movement: dict[str, Any], accuracy: dict[str, Any], top: list[dict[str, Any]],
                 flat: dict[str, Any]) -> None:
        """Eval summary metrics, a table of the most-moved positions, entropy and KL histograms."""
        if self.run is None:
            return
        import wandb

        for where in ("fork", "nonfork"):
            for key, value in (movement.get(where) or {}).items():
                if isinstance(value, (int, float)):
                    self.run.summary[f"movement/{where}/{key}"] = value
        for key in ("kl_ratio", "kl_share_at_forks", "fork_share_of_positions", "high_entropy_overlap"):
            if isinstance(movement.get(key), (int, float)):
                self.run.summary[f"movement/{key}"] = movement[key]
        for who in ("base", "adapter"):
            for key, value in accuracy[who].items():
                if isinstance(value, (int, float)):
                    self.run.summary[f"accuracy/{who}/{key}"] = value
        delta = accuracy["delta_pass_at_1"]
        if delta["mean"] is not None:
            self.run.summary["accuracy/delta_pass_at_1"] = delta["mean"]
            self.run.summary["accuracy/delta_pass_at_1_ci_lo"] = delta["ci95"][0]
            self.run.summary["accuracy/delta_pass_at_1_ci_hi"] = delta["ci95"][1]
        if top:
            columns = list(top[0])
            self.run.log({"eval/most_moved": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in top])})
        histograms = {"eval/base_entropy": flat["base_entropy"], "eval/kl_fork": flat["kl"][flat["fork"]],
                      "eval/kl_nonfork": flat["kl"][~flat["fork"]]}
        self.run.log({k: wandb.Histogram(v.numpy()) for k, v in histograms.items() if v.numel()})

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """A list of flat-ish dicts as a W&B table (nested values shown as JSON)."""
        if self.run is None or not rows:
            return
        import json

        import wandb

        columns = list(rows[0])
        data = [[v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v) for v in
                 (r.get(c) for c in columns)] for r in rows]
        self.run.log({key: wandb.Table(columns=columns, data=data)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

"""The stages that a sweep's or a compare's points share, defined once.

Every point of a sweep (or arm of a compare) with the same data, model, rollout, scoring
and selection settings reuses one base run's outputs of these stages: they run once in
the base folder (:func:`run_shared_stages`) and each point's folder links to them
(:func:`link_shared_stages`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..tracking import Tracker
from ..utils.storage import atomic_write_json, read_json
from .pipeline import STAGE_OUTPUTS, STAGES, Pipeline

SHARED_STAGES: tuple[str, ...] = STAGES[: STAGES.index("training")]
"""problems, rollouts, scoring, selection: everything a point does before it trains."""


def run_shared_stages(base_cfg: Config, progress: bool, *, tracked: bool = True) -> None:
    """Run :data:`SHARED_STAGES` in the base run folder, unless it holds them made with other settings.

    ``tracked=False`` keeps them out of W&B.
    """
    pipeline = Pipeline(base_cfg, progress=progress)
    fps = pipeline.fingerprints()
    states = [pipeline.state(s) for s in SHARED_STAGES]
    if any(st is not None and st.get("fingerprint") != fps[s] for s, st in zip(SHARED_STAGES, states)):
        return  # the base holds stages made with other settings: never overwrite them
    untracked = None if tracked else Tracker(base_cfg, pipeline.run_dir, enabled=False)
    pipeline.run(stages=SHARED_STAGES, tracker=untracked)


def link_shared_stages(base_dir: Path, point_cfg: Config) -> list[str]:
    """Point a sweep or compare point's folder at the base run's finished stages where they match.

    A stage is linked only when its fingerprint under the point's config equals the base
    run's, so a linked stage is always skipped and never written through the link.
    """
    point = Pipeline(point_cfg)
    fps = point.fingerprints()
    linked = []
    for stage in SHARED_STAGES:
        state_path = base_dir / "stages" / f"{stage}.json"
        if not state_path.exists():
            break
        state = read_json(state_path)
        if not state.get("done") or state.get("fingerprint") != fps[stage]:
            break
        for name in STAGE_OUTPUTS[stage]:
            target, link = (base_dir / name).resolve(), point.path(name)
            if link.is_symlink() or link.exists():
                if link.is_symlink() and link.resolve() == target:
                    continue
                raise ConfigError(f"'{link}' exists and is not the shared {stage} output; remove it")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, link)
        atomic_write_json(point._state_path(stage), state)
        linked.append(stage)
    return linked

"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def give_mixed_rewards(rollouts_path: str | Path) -> None:
    """A random tiny model solves nothing: mark even samples correct so selection has work."""
    path = Path(rollouts_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["reward"] = float(r["sample"] % 2 == 0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

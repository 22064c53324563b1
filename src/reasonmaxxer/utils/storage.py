"""Crash-safe files: atomic writes, append-only JSONL that survives a kill, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings (what a stage's output depends on)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a reader sees the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records and fsync; each record is one line, written whole or dropped on resume."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with open(path, "a") as fh:
        fh.write(lines)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl_cut_torn_tail(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by :func:`append_jsonl`; cut a torn last line off the file.

    A kill can leave the final line incomplete. This truncates the file to its last
    complete line (it writes!) so the next append starts on a clean line, and returns
    the complete records.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

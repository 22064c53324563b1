"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# FSDP2's forward on CPU records events on the CPU stream, which torch 2.6 lacks (its fully_shard runs on
# accelerators only: "'Stream' object has no attribute 'record_event'"); torch 2.13 and 2.14 run it here.
fsdp2_on_cpu = pytest.mark.skipif(not hasattr(torch.cpu.Stream(), "record_event"),
                                  reason="this torch's FSDP2 does not run on CPU processes")


def give_mixed_rewards(rollouts_path: str | Path) -> None:
    """A random tiny model solves nothing: mark even samples correct so selection has work."""
    path = Path(rollouts_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["reward"] = float(r["sample"] % 2 == 0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def wandb_records(run_file: str | Path) -> list:
    """The records of an offline run's ``.wandb`` file (``wandb_internal_pb2.Record``s).

    wandb 0.31 ships no reader for it, and no ``wandb-summary.json`` for an offline run. The
    file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each ``crc32 (4) | length (2, little endian) | type (1) | data``; type
    1 is a whole record, 2/3/4 the first/middle/last piece of one. A block's tail shorter
    than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    block, pos, pieces, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero-filled tail
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_summary_and_history(run_file: str | Path) -> tuple[dict, list[dict]]:
    """The final summary and the logged history rows of an offline run (values JSON-decoded)."""
    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    summary: dict = {}
    history: list[dict] = []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in record.history.item})
    return summary, history


def count_device_reads(monkeypatch) -> list[tuple[str, str]]:
    """Record every read of a tensor's value into Python made from ReasonMaxxer's own code.

    Each read (item, tolist, bool, float, int, index, nonzero) is a host sync on a GPU.
    Returns the list the reads are appended to, as (method, file name); the patches last
    until ``monkeypatch.undo()``.
    """
    reads: list[tuple[str, str]] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}reasonmaxxer{os.sep}" in caller:
                reads.append((_name, Path(caller).name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def wandb_runs_containing(wandb_dir: str | Path, needle: bytes, timeout: float = 60.0) -> list[bytes]:
    """The ``.wandb`` files under ``wandb_dir`` whose bytes contain ``needle``.

    W&B's service process writes an offline run's file after ``run.finish()`` has returned
    to the caller in some versions (a CI run read a file that still held only its 7-byte
    header), so this polls until a file has the needle or ``timeout`` seconds pass.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = [f.read_bytes() for f in Path(wandb_dir).glob("offline-run-*/run-*.wandb")]
        found = [data for data in found if needle in data]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)

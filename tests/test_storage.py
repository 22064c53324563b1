"""Tests for reasonmaxxer.utils.storage: fingerprints, atomic writes, torn-line-safe JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path

from reasonmaxxer.utils.storage import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    read_json,
    read_jsonl_cut_torn_tail,
    write_jsonl,
)


def test_fingerprint_stable_under_key_order_and_sensitive_to_values() -> None:
    a = {"model": "tiny", "rollout": {"num_samples": 8, "temperature": 0.6}, "kinds": ["add", "mul"]}
    b = {"kinds": ["add", "mul"], "rollout": {"temperature": 0.6, "num_samples": 8}, "model": "tiny"}
    fa = fingerprint(a)
    assert fa == fingerprint(b)
    assert fa == fingerprint(json.loads(json.dumps(a)))  # a round trip through JSON
    assert isinstance(fa, str) and len(fa) == 16 and int(fa, 16) >= 0
    changed = [
        {**a, "model": "other"},
        {**a, "rollout": {"num_samples": 9, "temperature": 0.6}},
        {**a, "rollout": {"num_samples": 8, "temperature": 0.61}},
        {**a, "kinds": ["mul", "add"]},  # list order is a value
        {**a, "extra": None},
    ]
    prints = {fingerprint(c) for c in changed}
    assert fa not in prints
    assert len(prints) == len(changed)
    # Non-JSON values go through str(); still stable.
    assert fingerprint({"p": Path("/x/y")}) == fingerprint({"p": Path("/x/y")})
    assert fingerprint({"p": Path("/x/y")}) != fingerprint({"p": Path("/x/z")})


def test_atomic_write_json_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"  # the parent is created
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert read_json(target) == {"a": [1, 2], "b": 1}
    atomic_write_json(target, {"step": 2})  # overwrite
    assert read_json(target) == {"step": 2}
    assert os.listdir(target.parent) == ["state.json"]
    atomic_write_text(tmp_path / "note.txt", "hello\n")
    assert (tmp_path / "note.txt").read_text() == "hello\n"
    assert sorted(os.listdir(tmp_path)) == ["note.txt", "sub"]


def test_read_jsonl_cut_torn_tail_missing_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    assert read_jsonl_cut_torn_tail(path) == []
    assert not path.exists()
    path.write_bytes(b"")
    assert read_jsonl_cut_torn_tail(path) == []


def test_append_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first = [{"id": 1, "text": "a\nb"}, {"id": 2, "text": "ü ∑"}]
    append_jsonl(path, first)
    append_jsonl(path, [])
    append_jsonl(path, [{"id": 3}])
    assert read_jsonl_cut_torn_tail(path) == first + [{"id": 3}]
    # One record per line.
    assert len(path.read_bytes().splitlines()) == 3


def test_torn_last_line_is_dropped_and_cut(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    complete = [{"id": 1, "v": [1, 2]}, {"id": 2, "v": "ü"}]
    good = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in complete)
    torn_record = json.dumps({"id": 3, "v": "∑∑∑∑"}, ensure_ascii=False).encode()
    # Cut inside a multi-byte character, as a kill mid-write can.
    cut = torn_record.index("∑".encode()) + 1
    path.write_bytes(good + torn_record[:cut])
    assert read_jsonl_cut_torn_tail(path) == complete
    assert path.read_bytes() == good  # the torn tail is cut from the file
    append_jsonl(path, [{"id": 3, "v": "x"}])
    # The file is valid JSONL line by line.
    lines = path.read_bytes().decode().splitlines()
    assert [json.loads(line) for line in lines] == complete + [{"id": 3, "v": "x"}]
    assert read_jsonl_cut_torn_tail(path) == complete + [{"id": 3, "v": "x"}]


def test_torn_only_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 1, "te')
    assert read_jsonl_cut_torn_tail(path) == []
    assert path.read_bytes() == b""
    append_jsonl(path, [{"id": 1}])
    assert read_jsonl_cut_torn_tail(path) == [{"id": 1}]


def test_write_jsonl_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    append_jsonl(path, [{"old": True}])
    write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert read_jsonl_cut_torn_tail(path) == [{"a": 1}, {"b": 2}]
    assert os.listdir(tmp_path) == ["out.jsonl"]

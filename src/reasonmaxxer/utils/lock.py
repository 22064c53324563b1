"""One writer per folder: a lock file that names the job holding it.

``hold_folder(output_dir)`` takes ``output_dir/.lock`` with ``fcntl.flock`` and writes the
holder's pid, host, start time and command into it. The OS drops a flock when its process
dies, so a ``kill -9`` never leaves a false lock: the file it leaves behind only tells the
next job whose run it takes over. A second job on the same folder while the first runs is
refused with a :class:`FolderInUseError` (one line, exit status 2) that names the holder.

A clean exit removes the file. Because a waiting job may have opened the file just before
it was removed, a job that gets the flock checks that it locked the file that is still at
the path (the same inode), and starts over otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from ..errors import UserError
from . import distributed as dist

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""The lock of a job that runs the pipeline in a folder."""
EVAL_LOCK_NAME = ".eval.lock"
"""eval.py's lock: it may run beside a training job in the same folder, not beside another eval."""

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""flock errors of file systems that do not support it (some network mounts)."""


class FolderInUseError(UserError):
    """Another job is writing into the same folder."""


def _holder_info(command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }


def _read_holder(fh: IO[str]) -> dict[str, Any] | None:
    """What the lock file says about its holder (None when empty or half written)."""
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "null")
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 123 on host-a since 2025-01-01T10:00:00+00:00 (python train.py ...)``."""
    if not info:
        return "a process that has not written its details yet"
    command = str(info.get("command") or "")
    command = command if len(command) <= 160 else command[:157] + "..."
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
            + (f" ({command})" if command else ""))


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder_alive_here(info: dict[str, Any] | None) -> bool:
    return bool(info) and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
        and info["pid"] != os.getpid() and pid_alive(info["pid"])


def _flock(fh: IO[str], path: Path) -> bool:
    """Take the flock without waiting: True when taken, False when another process holds it.

    Where the file system has no flock, the pid in the file decides instead (a live pid on
    this host holds the folder).
    """
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
        logger.warning("%s: the file system does not support flock (%s); checking the pid in it instead",
                       path, os.strerror(err.errno))
        return not _holder_alive_here(_read_holder(fh))


def _same_file(fh: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False


def _acquire(path: Path, what: str) -> IO[str]:
    """Open and flock ``path``; raise :class:`FolderInUseError` naming the holder when taken."""
    while True:
        fh = open(path, "a+")  # "a+": never truncate what the holder wrote before we own it
        if not _flock(fh, path):
            holder = describe_holder(_read_holder(fh))
            fh.close()
            raise FolderInUseError(f"{what} is in use by another job: {holder}. Wait for it to finish, "
                                   "or use another folder")
        if _same_file(fh, path):
            return fh
        fh.close()  # the holder removed the file between our open and our flock: try the new one


@contextlib.contextmanager
def hold_folder(folder: str | Path, *, name: str = LOCK_NAME, what: str | None = None,
                command: str | None = None) -> Iterator[Path]:
    """Hold ``folder/name`` for the ``with`` block; refuse when another live job holds it.

    ``what`` names the folder in messages (default ``output_dir: '<folder>'``); ``command``
    is recorded for the next job's message (default: this process's command line).
    Not re-entrant: one process takes a folder once.
    """
    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    what = what or f"output_dir: '{folder}'"
    try:
        fh = _acquire(path, what)
    except FolderInUseError:
        _remove_if_empty(created)
        raise
    try:
        previous = _read_holder(fh)
        if previous:
            logger.warning("%s: taking over the lock of %s, which is no longer running", what,
                           describe_holder(previous))
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder_info(command)) + "\n")
        fh.flush()
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _same_file(fh, path):
                path.unlink()  # removed while still locked, so no one can take the old file
        fh.close()
        _remove_if_empty(created)  # a run stopped by a bad input leaves no empty folder behind


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this lock created (deepest first) where nothing else was written."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): the run wrote there
            return


@contextlib.contextmanager
def hold_run_folder(folder: str | Path, *, command: str | None = None) -> Iterator[None]:
    """:func:`hold_folder` for a job of one or several processes (torchrun).

    Only the main process takes the lock; the others wait until it has (a collective), then
    all go on, or all raise the same :class:`FolderInUseError` when the folder is taken.
    """
    dist.init()
    with contextlib.ExitStack() as held:
        refusal = None
        if dist.is_main():
            try:
                held.enter_context(hold_folder(folder, command=command))
            except FolderInUseError as err:
                refusal = str(err)
        refusal = dist.gather_objects(refusal)[0]
        if refusal is not None:
            raise FolderInUseError(refusal)
        yield

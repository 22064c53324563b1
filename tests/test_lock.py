"""One writer per folder: a second job is refused, a killed job's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reasonmaxxer.utils.lock import EVAL_LOCK_NAME, LOCK_NAME, FolderInUseError, hold_folder, hold_run_folder

ROOT = Path(__file__).resolve().parents[1]

# A job that takes the folder, says so, and keeps it until its stdin closes.
HOLDER = """
import sys
from reasonmaxxer.utils.lock import hold_folder
with hold_folder(sys.argv[1], name=sys.argv[2], command="holder-job --config x.yaml"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture()
def holder(tmp_path):
    """Start a real process holding ``folder/name``; returns a function that starts one."""
    procs = []

    def start(folder: Path, name: str = LOCK_NAME) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_job_is_refused_with_the_holders_pid_host_and_command(tmp_path, holder):
    proc = holder(tmp_path / "run")
    with pytest.raises(FolderInUseError) as err:
        with hold_folder(tmp_path / "run"):
            pytest.fail("took a folder another live process holds")
    message = str(err.value)
    assert message.startswith(f"output_dir: '{tmp_path / 'run'}' is in use by another job: pid {proc.pid} "
                              f"on {socket.gethostname()} since ")
    assert "(holder-job --config x.yaml)" in message and "\n" not in message
    assert err.value.exit_code == 2


def test_a_finished_job_leaves_the_folder_free(tmp_path, holder, caplog):
    proc = holder(tmp_path / "run")
    proc.communicate("\n")  # the holder finishes its with block
    assert proc.returncode == 0
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="reasonmaxxer.utils.lock"):
        with hold_folder(tmp_path / "run") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not caplog.records  # nothing to take over
    assert not path.exists()


def test_the_lock_of_a_killed_job_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    proc = holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup: the file stays, naming a dead pid
    proc.wait()
    lock = tmp_path / "run" / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="reasonmaxxer.utils.lock"):
        with hold_folder(tmp_path / "run"):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"taking over the lock of pid {proc.pid} on {socket.gethostname()}" in warning


def test_other_lock_names_and_folders_are_independent(tmp_path, holder):
    holder(tmp_path / "run")  # a training job
    with hold_folder(tmp_path / "run", name=EVAL_LOCK_NAME):  # an eval of the same folder may run beside it
        with hold_folder(tmp_path / "other"):
            pass
    holder(tmp_path / "run", EVAL_LOCK_NAME)
    with pytest.raises(FolderInUseError, match="eval folder"):
        with hold_folder(tmp_path / "run", name=EVAL_LOCK_NAME, what="eval folder 'run'"):
            pass


def test_one_process_job_holds_the_folder(tmp_path, holder):
    with hold_run_folder(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    proc = holder(tmp_path / "run")
    with pytest.raises(FolderInUseError, match=f"pid {proc.pid} "):
        with hold_run_folder(tmp_path / "run"):
            pass


# ----------------------------------------------------------------------------- through the CLI


def test_train_on_a_held_folder_exits_2_with_one_line(tiny_model_dir, tmp_path, holder, capsys):
    from reasonmaxxer.cli import train_main
    from reasonmaxxer.testing import tiny_run_args

    run = tmp_path / "run"
    proc = holder(run)
    capsys.readouterr()
    assert train_main(tiny_run_args(tiny_model_dir, run)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: output_dir: '{run}' is in use by another job: "
                                               f"pid {proc.pid} on {socket.gethostname()}"), err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no work done


def test_eval_runs_beside_training_but_not_beside_another_eval(tiny_model_dir, tmp_path, holder, capsys):
    from reasonmaxxer.cli import eval_main
    from reasonmaxxer.testing import tiny_run_args

    run = tmp_path / "run"
    # eval's --output_dir is where it writes; --run_dir points it at the run (else the default
    # output_dir, relative to where the tests run, e.g. the demo's runs/demo, would be read)
    args = [*tiny_run_args(tiny_model_dir, run), "--run_dir", str(run)]
    holder(run)  # training holds the folder: eval goes on (and stops at the missing adapter)
    assert eval_main(args) == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    proc = holder(run, EVAL_LOCK_NAME)
    assert eval_main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: eval folder '{run}' is in use by another job: "
                                               f"pid {proc.pid} "), err


@pytest.mark.slow
def test_torchrun_job_on_a_held_folder_exits_2_in_every_process(tmp_path, holder):
    from reasonmaxxer.testing import tiny_run_args

    run = tmp_path / "run"
    proc = holder(run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *tiny_run_args(tmp_path / "no-model-needed", run)]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode != 0  # and it did not hang: rank 1 waited for rank 0's answer, then both stopped
    refusals = [line for line in job.stderr.splitlines() if line.startswith("error: output_dir:")]
    assert refusals and all(f"pid {proc.pid} " in line for line in refusals), job.stderr[-2000:]
    # Had either process gone on, it would have stopped at the missing model instead.
    assert "model.name_or_path" not in job.stderr

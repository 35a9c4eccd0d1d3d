"""Two runs in one run_dir: the second is refused with a message naming the first, which loses nothing; a lock
left by a dead run is taken over (issue 14, point 5)."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from trainer_testing import config_file, prepare_tiny_data, tiny_config, train_in_process

from mythos_train.checkpoint import checkpoint_dirs
from mythos_train.config import ConfigError
from mythos_train.run_lock import LOCK, RunDirInUse, RunDirLock
from mythos_train.stop_signals import STOPPED_EXIT


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _write_lock(run, **owner):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "job": "", "started": time.time(), **owner}))


def test_a_live_run_holding_the_run_dir_refuses_the_second(data_dir, tmp_path):
    run = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the other run's process
    try:
        _write_lock(run, pid=other.pid, job="4242")
        (run / "config.json").write_text("the other run's")
        with pytest.raises(ConfigError, match=rf"{run} is in use by another run \(host .*, pid {other.pid}, job 4242"):
            train_in_process(tiny_config(data_dir, run, ["--train.steps=1", "--checkpoint.every_steps=1"]))
        assert (run / "config.json").read_text() == "the other run's"  # nothing of the other run was touched
        assert not (run / "checkpoints").exists()
        assert json.loads((run / LOCK).read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("owner", ["dead process on this host", "earlier attempt of this job"])
def test_a_stale_lock_is_taken_over_and_released_at_the_end(data_dir, tmp_path, monkeypatch, owner):
    run = tmp_path / "run"
    if owner == "dead process on this host":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _write_lock(run, pid=dead.pid)
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        _write_lock(run, pid=os.getpid(), host="another-host", job="job-7")
    trainer = train_in_process(tiny_config(data_dir, run, ["--train.steps=1", "--checkpoint.every_steps=1"]))
    assert trainer.step == 1 and [s for s, _ in checkpoint_dirs(run / "checkpoints")] == [1]
    assert not (run / LOCK).exists()


@pytest.mark.slow
def test_two_runs_started_together_one_trains_the_other_is_refused(data_dir, tmp_path):
    config = config_file(data_dir, tmp_path / "run")
    cmd = [sys.executable, "-m", "mythos_train", "train", "--config", str(config), "--train.steps=100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoints").exists():  # the first run has saved a checkpoint
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        first.send_signal(signal.SIGTERM)  # stop the first with a checkpoint
        out, _ = first.communicate(timeout=240)
    finally:
        first.kill()
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-3000:]
    assert first.returncode == STOPPED_EXIT, out[-3000:]
    stopped_at = int(out.split("stopped by SIGTERM after step ")[1].split(",")[0])
    assert checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1][0] == stopped_at  # the first's work is all there


# --------------------------------------------------------------------------- the lock alone (no training)


@pytest.fixture
def other_process():
    """A live process of this host standing for another run's rank 0."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield other.pid
    other.kill()
    other.wait()


def _no_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)


@pytest.mark.parametrize(
    ("variable", "value"), [("TORCHELASTIC_RUN_ID", "none"), ("SLURM_JOB_ID", "77")], ids=["plain torchrun", "slurm"]
)
def test_a_shared_job_id_does_not_take_over_a_live_process(tmp_path, monkeypatch, other_process, variable, value):
    """Plain torchrun sets TORCHELASTIC_RUN_ID=none for every run, and two srun steps share SLURM_JOB_ID: a job id
    alone does not make the live lock of another process on this host stale."""
    _no_job(monkeypatch)
    monkeypatch.setenv(variable, value)
    _write_lock(tmp_path, pid=other_process, job=value)
    before = (tmp_path / LOCK).read_text()
    with pytest.raises(RunDirInUse, match=f"pid {other_process}"):
        RunDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK).read_text() == before


def test_a_lock_being_written_is_held_not_stale(tmp_path, monkeypatch, other_process):
    """An empty lock a few milliseconds old is another run writing it: wait for its content, then refuse."""
    _no_job(monkeypatch)
    (tmp_path / LOCK).write_text("")
    writer = threading.Timer(0.5, lambda: _write_lock(tmp_path, pid=other_process))
    writer.start()
    try:
        with pytest.raises(RunDirInUse, match=f"pid {other_process}"):
            RunDirLock(tmp_path).acquire()
    finally:
        writer.join()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == other_process


@pytest.mark.parametrize("owner", ["our own pid (a restarted container)", "a reused pid (another start time)"])
def test_a_lock_of_a_pid_that_is_not_its_writer_is_stale(tmp_path, monkeypatch, other_process, owner):
    _no_job(monkeypatch)
    if owner.startswith("our own"):
        _write_lock(tmp_path, pid=os.getpid())
    else:
        _write_lock(tmp_path, pid=other_process, pid_start=1)  # the live process started at another time
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.held and json.loads((tmp_path / LOCK).read_text())["started"] > time.time() - 60
    lock.release()


def _take_over(run, start, won):
    start.wait()
    lock = RunDirLock(run)
    try:
        lock.acquire()
    except RunDirInUse:
        return
    won.put(os.getpid())
    time.sleep(3)  # hold it while the others try
    lock.release()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path, monkeypatch):
    """Eight processes find the same dead run's lock at once: one takes it, the others are refused (a takeover
    that deletes and re-creates the lock lets a slow one delete the winner's fresh lock)."""
    _no_job(monkeypatch)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    context = multiprocessing.get_context("fork")
    start, won = context.Event(), context.Queue()
    racers = [context.Process(target=_take_over, args=(tmp_path, start, won)) for _ in range(8)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(timeout=60)
    winners = []
    while not won.empty():
        winners.append(won.get())
    assert len(winners) == 1, winners

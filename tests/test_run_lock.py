"""Two runs in one run_dir: the second is refused with a message naming the first, which loses nothing; a lock
left by a dead run is taken over (issue 14, point 5)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from trainer_testing import config_file, prepare_tiny_data, tiny_config, train_in_process

from mythos_train.checkpoint import checkpoint_dirs
from mythos_train.config import ConfigError
from mythos_train.run_lock import LOCK
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

"""Elastic restarts under torchrun lose nothing: faults injected into a 2-process CPU run of the tiny job.

The reference is an uninterrupted run of the same config. After a rank is SIGKILLed (between checkpoints, or
while a checkpoint is being saved) torchrun restarts the group, the trainer resumes from the newest *complete*
checkpoint, and the losses from there on, the windows each step read and the final model and AdamW state must be
bitwise those of the reference. A run that shrinks (2 -> 1 process) and grows (1 -> 2) through torchrun's c10d
rendezvous must read the training stream without repeating or skipping a window.

The kill tests run torchrun with its default shared store, so they exercise the trainer's own guard against
pytorch issue 135712 (distributed.attempt_store); the membership test sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
as launch/env.sh does, because with the shared store torchrun's agents themselves hang when a node joins.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from elastic_testing import (
    checkpoint_state,
    consumed_windows,
    final_timeline,
    free_port,
    kill_tree,
    read_records,
    run,
    run_env,
    stream_windows,
    torchrun,
    train_command,
)
from trainer_testing import config_file, prepare_tiny_data

from mythos_train.checkpoint import MARKER, find_latest
from mythos_train.distributed import ATTEMPT_STORE_KEY, attempt_store, fault_point
from mythos_train.stop_signals import STOPPED_EXIT

STEPS = 10
EVERY = 3  # complete checkpoints at steps 3, 6, 9 and 10
FIXED_WORLD = [
    f"--train.steps={STEPS}",
    f"--checkpoint.every_steps={EVERY}",
    "--checkpoint.keep_last=10",
    "--parallel.ep=2",
    "--data.return_window_ids=true",
    "--metrics.tensorboard=false",
    "--metrics.loop_telemetry=false",
]


# --------------------------------------------------------------------------- the pieces, in process


def test_attempt_store_skips_entries_left_by_earlier_attempts(monkeypatch):
    """Rank 1 starts before rank 0 publishes; the shared store still names a dead store and a live foreign one."""
    timeout = timedelta(seconds=60)
    shared = dist.TCPStore("localhost", 0, is_master=True, timeout=timeout, wait_for_workers=False)
    foreign = dist.TCPStore("localhost", 0, is_master=True, timeout=timeout, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(shared.port))
    shared.set(ATTEMPT_STORE_KEY, f"{free_port()} token-of-a-dead-attempt")  # nothing listens there any more
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(store=attempt_store(1, timeout)))
    rank1.start()
    time.sleep(0.5)
    shared.set(ATTEMPT_STORE_KEY, f"{foreign.port} token-of-another-attempt")  # alive, but not this attempt's
    time.sleep(0.5)
    assert rank1.is_alive()
    store0 = attempt_store(0, timeout)
    rank1.join(timeout=30)
    store0.set("from rank 0", "hello")
    assert got["store"].get("from rank 0") == b"hello"


def test_fault_injection_fires_only_where_asked_and_on_the_first_attempt(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    for spec, restart in (("0:3", "0"), ("1:4", "0"), ("1:3:save", "0"), ("1:3", "1")):
        monkeypatch.setenv("MYTHOS_FAULT_KILL_AT_STEP", spec)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        fault_point("step", 3)  # another rank, step or place, or a restarted attempt: nothing happens
    monkeypatch.setenv("MYTHOS_FAULT_KILL_AT_STEP", "1-3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="MYTHOS_FAULT_KILL_AT_STEP"):
        fault_point("step", 3)
    code = "from mythos_train.distributed import fault_point; fault_point('step', 2); fault_point('step', 3); print('alive')"
    env = {"RANK": "1", "MYTHOS_FAULT_KILL_AT_STEP": "1:3", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == -9 and "SIGKILL rank 1 at step 3" in proc.stdout and "alive" not in proc.stdout


# --------------------------------------------------------------------------- torchrun runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def _run_two_ranks(root: Path, data_dir: Path, fault: str | None = None) -> tuple[Path, str]:
    """The fixed-world job on 2 processes (max 1 restart), optionally with MYTHOS_FAULT_KILL_AT_STEP=fault."""
    records = root / "records"
    records.mkdir(parents=True)
    env = run_env(records, **({"MYTHOS_FAULT_KILL_AT_STEP": fault} if fault else {}))
    cmd = train_command(torchrun(2, max_restarts=1 if fault else 0), config_file(data_dir, root / "run"), *FIXED_WORLD)
    return root / "run", run(cmd, env, root / "log.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run: per-step records and its checkpoints."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, _ = _run_two_ranks(root, data_dir)
    timeline = final_timeline(read_records(root / "records"))
    assert sorted(timeline) == list(range(1, STEPS + 1))
    return {
        "run": run_dir,
        "timeline": timeline,
        "final": checkpoint_state(run_dir / "checkpoints" / f"step-{STEPS}", root),
    }


def _assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _assert_resumed_and_identical(root: Path, run_dir: Path, reference: dict, killed_at: int, resume_from: int) -> None:
    records = read_records(root / "records")
    first, second = [r for r in records if r["restart"] == 0], [r for r in records if r["restart"] == 1]
    assert max(r["step"] for r in first) == killed_at, "the first attempt must die where the fault was injected"
    assert second and min(r["step"] for r in second) == resume_from + 1, "resume from the newest complete checkpoint"
    timeline = final_timeline(records)
    assert sorted(timeline) == list(range(1, STEPS + 1))
    for step in range(resume_from + 1, STEPS + 1):  # the loss curve from the resume point on, bitwise
        assert [r["loss"] for r in timeline[step]] == [r["loss"] for r in reference["timeline"][step]], step
    assert consumed_windows(timeline) == consumed_windows(reference["timeline"])
    _assert_same_state(checkpoint_state(run_dir / "checkpoints" / f"step-{STEPS}", root), reference["final"])


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "step", "resume_from"), [(1, 5, 3), (0, 7, 6), (1, 9, 6)])
def test_sigkilled_rank_is_restarted_and_training_matches_the_uninterrupted_run(
    reference, data_dir, tmp_path, rank, step, resume_from
):
    # Step 9 is a checkpoint step: the kill comes right after its update, before its save, so 6 is the newest.
    run_dir, log = _run_two_ranks(tmp_path, data_dir, fault=f"{rank}:{step}")
    assert f"fault injection: SIGKILL rank {rank} at step {step}" in log
    assert "restart 1 of at most 1" in log  # the trainer logs torchrun's restart count
    _assert_resumed_and_identical(tmp_path, run_dir, reference, killed_at=step, resume_from=resume_from)


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_the_previous_one_and_continues(reference, data_dir, tmp_path):
    # Rank 0 dies after every shard of step 6 and its .metadata are written, before the COMPLETE marker.
    run_dir, log = _run_two_ranks(tmp_path, data_dir, fault="0:6:save")
    assert "fault injection: SIGKILL rank 0 at save 6" in log
    _assert_resumed_and_identical(tmp_path, run_dir, reference, killed_at=6, resume_from=3)
    folder = run_dir / "checkpoints"
    assert (folder / "step-6" / MARKER).is_file()  # the partial save was replaced by a complete one
    previous = checkpoint_state(folder / "step-3", tmp_path)  # the checkpoint resumed from is intact
    _assert_same_state(previous, checkpoint_state(reference["run"] / "checkpoints" / "step-3", tmp_path / "ref"))


# --------------------------------------------------------------------------- stop signals (preemption)


def _holding_ranks(records: Path, step: int) -> set[int]:
    return {r["rank"] for r in read_records(records, "hold") if r["step"] == step}


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "target"), [("SIGTERM", "torchrun"), ("SIGUSR1", "rank 1 only")])
def test_stop_signal_saves_the_step_and_the_resumed_run_equals_the_uninterrupted_one(
    reference, data_dir, tmp_path, signal_name, target
):
    """A signal before a random step: every rank finishes that step, saves it and exits; a restart loses nothing.

    To torchrun (as SLURM and Ctrl-C deliver it) the agent passes it to every worker; to rank 1 alone, rank 0
    learns of it through the per-step all-reduce and stops after the same step.
    """
    stop_step = random.randint(2, STEPS - 1)
    records, hold = tmp_path / "records", tmp_path / "hold"
    records.mkdir()
    hold.write_text(str(stop_step - 1))  # every rank waits before stop_step, so the signal lands at a known step
    config = config_file(data_dir, tmp_path / "run")
    launcher = [*torchrun(2, max_restarts=0), "--signals_to_handle=SIGTERM,SIGINT,SIGUSR1"]
    cmd = train_command(launcher, config, *FIXED_WORLD)
    with open(tmp_path / "stopped.log", "w") as log:
        proc = subprocess.Popen(
            cmd, env=run_env(records, MYTHOS_TEST_HOLD_FILE=str(hold)), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for(lambda: _holding_ranks(records, stop_step) == {0, 1}, [proc], f"both ranks before step {stop_step}")
        if target == "torchrun":
            pid = proc.pid
        else:
            (file,) = records.glob("rank1-pid*.jsonl")
            pid = int(file.stem.split("-pid")[1])
        os.kill(pid, signal.Signals[signal_name])
        hold.write_text(str(STEPS))
        proc.wait(timeout=180)
    finally:
        kill_tree(proc)
    log = (tmp_path / "stopped.log").read_text()
    where = f"random stop step {stop_step}, signal {signal_name} to {target}:\n{log[-4000:]}"
    assert f"stopped by {signal_name} after step {stop_step}" in log, where
    assert f"exit status {STOPPED_EXIT}" in log, where
    stopped = read_records(records)
    assert {r["rank"]: r["step"] for r in stopped} == {0: stop_step, 1: stop_step}, where  # both stopped there
    assert (tmp_path / "run" / "checkpoints" / f"step-{stop_step}" / MARKER).is_file(), where

    run(train_command(torchrun(2, max_restarts=0), config, *FIXED_WORLD), run_env(records), tmp_path / "resumed.log")
    timeline = final_timeline(read_records(records))
    assert min(r["step"] for r in read_records(records)[len(stopped) :]) == stop_step + 1, where  # nothing redone
    assert sorted(timeline) == list(range(1, STEPS + 1))
    for step in timeline:  # the loss curve, bitwise
        assert [r["loss"] for r in timeline[step]] == [r["loss"] for r in reference["timeline"][step]], (step, where)
    assert consumed_windows(timeline) == consumed_windows(reference["timeline"])
    state = checkpoint_state(tmp_path / "run" / "checkpoints" / f"step-{STEPS}", tmp_path)
    _assert_same_state(state, reference["final"])


@pytest.mark.slow
def test_a_frozen_rank_times_out_the_others_and_the_restarted_run_finishes(reference, data_dir, tmp_path):
    """Rank 1 SIGSTOPped before step 5: rank 0's next collective fails within parallel.timeout_s, torchrun
    restarts the group (SIGKILLing the frozen process after its 30 s grace) and the run resumes from step 3."""
    timeout_s = 20
    records, hold = tmp_path / "records", tmp_path / "hold"
    records.mkdir()
    hold.write_text("4")
    cmd = train_command(
        torchrun(2, max_restarts=1),
        config_file(data_dir, tmp_path / "run"),
        *FIXED_WORLD,
        f"--parallel.timeout_s={timeout_s}",
    )
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            cmd, env=run_env(records, MYTHOS_TEST_HOLD_FILE=str(hold)), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for(lambda: _holding_ranks(records, 5) == {0, 1}, [proc], "both ranks before step 5")
        (file,) = records.glob("rank1-pid*.jsonl")
        os.kill(int(file.stem.split("-pid")[1]), signal.SIGSTOP)
        frozen_at = time.time()
        hold.write_text(str(STEPS))
        proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-6000:]
    records = read_records(records)
    first_resumed = min(r["time"] for r in records if r["restart"] == 1)
    # timeout_s for rank 0 to fail, torchrun's 30 s before it SIGKILLs the frozen rank, then a new group starts
    assert first_resumed - frozen_at < timeout_s + 30 + 90, log[-6000:]
    _assert_resumed_and_identical(tmp_path, tmp_path / "run", reference, killed_at=4, resume_from=3)


# --------------------------------------------------------------------------- membership changes


def _wait_for(condition, procs: list[subprocess.Popen], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"gave up waiting for {what} (exit codes {[p.poll() for p in procs]})")
        time.sleep(0.2)


@pytest.mark.slow
def test_world_shrinks_and_grows_without_repeating_or_skipping_data(data_dir, tmp_path):
    """1 node -> a second node joins (1 -> 2 processes) -> it dies (2 -> 1), through torchrun's c10d rendezvous."""
    steps, every = 28, 4
    records, hold = tmp_path / "records", tmp_path / "hold"
    records.mkdir()
    config = config_file(data_dir, tmp_path / "run")
    overrides = [
        f"--train.steps={steps}",
        f"--checkpoint.every_steps={every}",
        "--checkpoint.keep_last=10",
        "--data.return_window_ids=true",
        "--metrics.tensorboard=false",
        "--metrics.loop_telemetry=false",
    ]
    env = run_env(records, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", MYTHOS_TEST_HOLD_FILE=str(hold))
    cmd = train_command(
        torchrun(1, max_restarts=2, rdzv=(f"localhost:{free_port()}", "elastic-test")), config, *overrides
    )
    folder = tmp_path / "run" / "checkpoints"

    def holding(step: int, world_size: int):  # every rank of a world of this size waits before `step`
        return lambda: (
            len(
                {
                    r["rank"]
                    for r in read_records(records, "hold")
                    if r["step"] == step and r["world_size"] == world_size
                }
            )
            == world_size
        )

    # Ranks wait before steps 13 and 21, so the membership changes right after the checkpoints of steps 12 and 20.
    hold.write_text("12")
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    node0 = subprocess.Popen(cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    node1 = None
    try:
        _wait_for(holding(13, 1), [node0], "node 0 alone to reach step 12")
        node1 = subprocess.Popen(cmd, env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(holding(13, 2), [node0, node1], "both nodes to resume from step 12")
        hold.write_text("20")
        _wait_for(holding(21, 2), [node0, node1], "both nodes to reach step 20")
        kill_tree(node1)  # the second node dies; the first one's worker fails in its next collective
        hold.write_text(str(steps))
        node0.wait(timeout=180)
    finally:
        for proc in (node0, node1):
            if proc is not None:
                kill_tree(proc)
        for log in logs:
            log.close()
    assert node0.returncode == 0, (tmp_path / "node0.log").read_text()[-6000:]

    timeline = final_timeline(read_records(records))
    assert sorted(timeline) == list(range(1, steps + 1))
    world = {step: len(recs) for step, recs in timeline.items()}
    assert world == {s: 1 if s <= 12 or s > 20 else 2 for s in range(1, steps + 1)}
    consumed = consumed_windows(timeline)
    assert len(consumed) == (12 + 8 * 2 + 8) * 2  # micro-batch 2 per rank and step
    assert consumed == stream_windows(config, len(consumed))  # the stream's prefix: nothing repeated or skipped
    assert find_latest(folder).name == f"step-{steps}"

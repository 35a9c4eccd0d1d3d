"""Elastic restarts: SIGKILL a random worker at a random moment, N times, and time the recovery (prints, no asserts).

One run of the tiny job (dim 64, 4 experts, seq 32, fp32) through launch/single_node.sh on 2 processes; after
each recovery it trains a few more steps, waits a random 0-0.5 s (so kills land in forward/backward, the
optimizer, logging or a checkpoint save) and SIGKILLs one worker. Recovery time runs from the kill to the first
step completed by the restarted group, split into "to the new attempt" (torchrun notices, stops the survivor,
re-rendezvouses, starts processes, imports) and "to the first step" (process group, model, checkpoint load, one
step). Work redone = steps since the newest complete checkpoint at the moment of the kill.

    python benchmarks/bench_restart.py [--trials 10] [--checkpoint-every 5] [--shared-store] [--seed 0]

--shared-store keeps torchrun's default store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0), so the trainer's own
guard (mythos_train/distributed.py) is what makes the restarts work.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # trainer_testing: the tests' tiny job

from trainer_testing import config_file, prepare_tiny_data

REPO = Path(__file__).resolve().parents[1]

STEP = re.compile(r"^step +(\d+)/")
ATTEMPT = re.compile(r"torchrun attempt: restart (\d+)")
SAVED = re.compile(r"checkpoint saved: .*step-(\d+)")


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((time.monotonic(), line))
    lines.put((time.monotonic(), None))


def _workers(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _kill_tree(pid: int) -> None:
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            pids += _workers(p)
            os.kill(p, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument(
        "--steps-between", type=int, default=6, help="steps trained after a recovery before the next kill"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds a recovery may take before it counts as failed"
    )
    parser.add_argument(
        "--shared-store",
        action="store_true",
        help="leave torchrun's shared store on (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    root = Path(tempfile.mkdtemp(prefix="bench_restart_"))
    config = config_file(prepare_tiny_data(root), root / "run")
    overrides = [
        "--train.steps=100000",
        "--parallel.ep=2",
        f"--checkpoint.every_steps={args.checkpoint_every}",
        "--metrics.tensorboard=false",
        "--metrics.loop_telemetry=false",
    ]
    env = dict(os.environ, PYTHON=sys.executable, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0" if args.shared_store else "1")
    env.pop("MYTHOS_FAULT_KILL_AT_STEP", None)
    cmd = [
        "bash",
        str(REPO / "launch" / "single_node.sh"),
        "--nproc",
        "2",
        "--max-restarts",
        str(args.trials),
        "--config",
        str(config),
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    state = {"attempt": 0, "step": 0, "saved": 0, "attempt_time": None}

    def next_event(deadline: float) -> tuple[float, str] | None:
        """Next output line (tracking attempt, step and newest checkpoint), or None at the deadline or the end."""
        try:
            t, line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            return None
        if line is None:
            return None
        if m := ATTEMPT.search(line):
            state["attempt"], state["attempt_time"] = int(m.group(1)), t
        elif m := SAVED.search(line):
            state["saved"] = int(m.group(1))
        elif m := STEP.match(line):
            state["step"] = int(m.group(1))
        return t, line

    def steps_done(count: int, deadline: float) -> float | None:
        """Wait until `count` step lines of the current attempt arrived; the arrival time of the first one."""
        first, seen = None, 0
        while seen < count:
            event = next_event(deadline)
            if event is None:
                return None
            if STEP.match(event[1]):
                seen += 1
                first = first or event[0]
        return first

    recover, to_attempt, to_step, redone = [], [], [], []
    attempted = 0
    try:
        if steps_done(args.steps_between, time.monotonic() + args.timeout) is None:
            raise SystemExit("the job did not start training:\n" + "".join(line for _, line in list(lines.queue)[-40:]))
        for trial in range(args.trials):
            time.sleep(rng.uniform(0.0, 0.5))
            while not lines.empty():  # catch up with what was printed meanwhile
                next_event(time.monotonic())
            victims = _workers(proc.pid)
            if not victims:
                break
            victim = rng.choice(victims)
            step_at_kill, saved_at_kill, attempt = state["step"], state["saved"], state["attempt"]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            attempted += 1
            deadline = killed + args.timeout
            while state["attempt"] == attempt:  # the restarted group announces itself ...
                if next_event(deadline) is None:
                    break
            first_step = steps_done(1, deadline) if state["attempt"] != attempt else None  # ... then trains a step
            if first_step is None:
                print(f"trial {trial + 1}: not recovered within {args.timeout:.0f} s")
                break
            recover.append(first_step - killed)
            to_attempt.append(state["attempt_time"] - killed)
            to_step.append(first_step - state["attempt_time"])
            redone.append(step_at_kill - saved_at_kill)
            print(
                f"trial {trial + 1}: killed pid {victim} at step {step_at_kill} (newest checkpoint {saved_at_kill}), "
                f"attempt {state['attempt']} stepped after {recover[-1]:.1f} s"
            )
            if trial + 1 < args.trials and steps_done(args.steps_between - 1, deadline + args.timeout) is None:
                break
    finally:
        _kill_tree(proc.pid)
        shutil.rmtree(root, ignore_errors=True)

    store = (
        "torchrun's shared store + the trainer's per-attempt store"
        if args.shared_store
        else "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    )
    print(f"\nrestarts attempted {attempted}, recovered {len(recover)} ({store}; 2 CPU processes, gloo)")
    if recover:
        print(
            f"time to recover (kill -> first step of the new group): median {statistics.median(recover):.1f} s, max {max(recover):.1f} s"
        )
        print(
            f"  kill -> new attempt starts:   median {statistics.median(to_attempt):.1f} s, max {max(to_attempt):.1f} s"
        )
        print(f"  new attempt -> first step:    median {statistics.median(to_step):.1f} s, max {max(to_step):.1f} s")
        print(
            f"steps redone per restart (since the newest complete checkpoint, every {args.checkpoint_every}): "
            f"median {statistics.median(redone):.0f}, max {max(redone)}"
        )


if __name__ == "__main__":
    main()
